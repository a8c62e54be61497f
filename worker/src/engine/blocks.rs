//! The paged block manager of the latent cache: which cache blocks belong to which sequence.
//!
//! The model's `LatentCache` is one pool of `num_blocks` fixed-size blocks; this module only hands
//! out block ids. A sequence owns a [`BlockTable`] (its blocks in position order). Full blocks are
//! keyed by a hash of (parent block hash, the block's token ids), so two prompts with a common
//! prefix share the blocks of that prefix (reference counted). A block nobody references keeps its
//! contents and stays findable by hash until the pool needs it: such blocks are evicted least
//! recently used first.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Index of a block in the latent cache pool.
pub type BlockId = u32;

/// The pool has no block left for a request, even after evicting every unreferenced cached block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("latent cache pool exhausted: {needed} more blocks needed, {available} available")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub available: usize,
}

/// The blocks of one sequence, in position order: block `i` holds positions
/// `[i * block_size, (i + 1) * block_size)`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    /// Prefix hashes of the leading full blocks that are registered in the prefix cache.
    hashes: Vec<u64>,
    /// The parent hash of the first block: `None`, or the request's cache salt, so that requests
    /// with different salts never share (or learn of) each other's cached prefixes.
    root: Option<u64>,
}

/// The root hash of a cache salt, apart from every block hash (a salt is hashed with a tag that no
/// block's token list can produce).
pub fn salt_hash(salt: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    "latentserve cache salt".hash(&mut hasher);
    salt.hash(&mut hasher);
    hasher.finish()
}

impl BlockTable {
    /// An empty table whose prefix is shared only with requests of the same `salt` (`None`: with
    /// every unsalted request).
    pub fn salted(salt: Option<&str>) -> Self {
        Self {
            root: salt.map(salt_hash),
            ..Self::default()
        }
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    ref_count: u32,
    /// Set while the block is findable in the prefix cache.
    cached: Option<CachedKey>,
    /// Position in the eviction order while unreferenced and cached.
    lru_tick: Option<u64>,
}

#[derive(Debug, Clone)]
struct CachedKey {
    hash: u64,
    parent: Option<u64>,
    tokens: Vec<u32>,
}

/// Allocates, shares and frees latent cache blocks. All operations are O(blocks touched).
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    prefix_caching: bool,
    meta: Vec<BlockMeta>,
    /// Blocks with no reference and no cached contents.
    free: VecDeque<BlockId>,
    /// Unreferenced cached blocks by eviction order (oldest tick first).
    evictable: BTreeMap<u64, BlockId>,
    by_hash: HashMap<u64, BlockId>,
    tick: u64,
    /// Hashes whose findability changed since [`BlockManager::take_cache_changes`]; kept only
    /// while someone (the request router) watches the cache.
    touched: Option<HashSet<u64>>,
}

/// How the prefix cache changed between two reports, as net effect: a block evicted and cached
/// again in between is reported as added (which a reader that knew it already can ignore).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheChanges {
    pub added: Vec<u64>,
    pub removed: Vec<u64>,
}

impl CacheChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// The chained hash of a full block: a block's identity includes everything before it.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let num_blocks = num_blocks.min(BlockId::MAX as usize);
        Self {
            block_size,
            prefix_caching,
            meta: vec![BlockMeta::default(); num_blocks],
            free: (0..num_blocks as BlockId).collect(),
            evictable: BTreeMap::new(),
            by_hash: HashMap::new(),
            tick: 0,
            touched: None,
        }
    }

    /// Starts or stops recording which block hashes become findable or get evicted.
    pub fn record_cache_changes(&mut self, on: bool) {
        self.touched = on.then(HashSet::new);
    }

    /// Every findable block hash: the snapshot a watcher starts from.
    pub fn cached_hashes(&self) -> Vec<u64> {
        self.by_hash.keys().copied().collect()
    }

    /// The changes since the previous call (empty while not recording).
    pub fn take_cache_changes(&mut self) -> CacheChanges {
        let Some(touched) = self.touched.as_mut() else {
            return CacheChanges::default();
        };
        let mut changes = CacheChanges::default();
        for hash in touched.drain() {
            if self.by_hash.contains_key(&hash) {
                changes.added.push(hash);
            } else {
                changes.removed.push(hash);
            }
        }
        changes
    }

    fn touch(&mut self, hash: u64) {
        if let Some(touched) = self.touched.as_mut() {
            touched.insert(hash);
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks that an allocation can take now: never used, or cached but unreferenced.
    pub fn num_available_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.num_blocks() - self.num_available_blocks()
    }

    /// Fraction of the pool referenced by sequences (cached but unreferenced blocks count as free).
    pub fn usage_ratio(&self) -> f64 {
        if self.meta.is_empty() {
            return 0.0;
        }
        self.num_used_blocks() as f64 / self.num_blocks() as f64
    }

    /// Blocks needed to hold `num_tokens` positions.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Number of leading tokens of `tokens` whose blocks are in the prefix cache, without taking
    /// them. At least one token is always left to compute, because the model needs it to produce
    /// the next token's logits.
    pub fn cached_prefix_len(&self, tokens: &[u32], salt: Option<&str>) -> usize {
        self.matching_prefix(tokens, salt.map(salt_hash)).len() * self.block_size
    }

    fn matching_prefix(&self, tokens: &[u32], root: Option<u64>) -> Vec<(BlockId, u64)> {
        let mut found = Vec::new();
        if !self.prefix_caching || tokens.is_empty() {
            return found;
        }
        let shareable = (tokens.len() - 1) / self.block_size;
        let mut parent = root;
        for chunk in tokens.chunks_exact(self.block_size).take(shareable) {
            let hash = block_hash(parent, chunk);
            let Some(&id) = self.by_hash.get(&hash) else {
                break;
            };
            // A 64-bit collision must never hand out another prompt's latents.
            let key = self.meta[id as usize].cached.as_ref();
            if !key.is_some_and(|key| key.parent == parent && key.tokens == chunk) {
                break;
            }
            found.push((id, hash));
            parent = Some(hash);
        }
        found
    }

    /// Starts an empty `table` with the cached blocks of `tokens`' prefix, taking a reference on
    /// each. Returns the number of tokens whose latents are already in the cache.
    pub fn acquire_prefix(&mut self, table: &mut BlockTable, tokens: &[u32]) -> usize {
        assert!(
            table.is_empty(),
            "prefix can only start an empty block table"
        );
        let found = self.matching_prefix(tokens, table.root);
        for &(id, hash) in &found {
            self.take_ref(id);
            table.blocks.push(id);
            table.hashes.push(hash);
        }
        found.len() * self.block_size
    }

    fn take_ref(&mut self, id: BlockId) {
        let meta = &mut self.meta[id as usize];
        if let Some(tick) = meta.lru_tick.take() {
            self.evictable.remove(&tick);
        }
        meta.ref_count += 1;
    }

    /// Grows `table` to cover `num_tokens` positions. Either all needed blocks are allocated or
    /// none is.
    pub fn ensure_capacity(
        &mut self,
        table: &mut BlockTable,
        num_tokens: usize,
    ) -> Result<(), OutOfBlocks> {
        let needed = self
            .blocks_for(num_tokens)
            .saturating_sub(table.blocks.len());
        let available = self.num_available_blocks();
        if needed > available {
            return Err(OutOfBlocks { needed, available });
        }
        for _ in 0..needed {
            let id = self.take_free_block();
            self.meta[id as usize].ref_count = 1;
            table.blocks.push(id);
        }
        Ok(())
    }

    fn take_free_block(&mut self) -> BlockId {
        if let Some(id) = self.free.pop_front() {
            return id;
        }
        let (_, id) = self
            .evictable
            .pop_first()
            .expect("caller checked that a block is available");
        let meta = &mut self.meta[id as usize];
        meta.lru_tick = None;
        if let Some(key) = meta.cached.take() {
            self.by_hash.remove(&key.hash);
            self.touch(key.hash);
        }
        id
    }

    /// Makes the full blocks among the first `num_computed` positions of `tokens` findable by
    /// later prompts. Call after the model has written those positions.
    pub fn register_full_blocks(
        &mut self,
        table: &mut BlockTable,
        tokens: &[u32],
        num_computed: usize,
    ) {
        if !self.prefix_caching {
            return;
        }
        let full = (num_computed.min(tokens.len()) / self.block_size).min(table.blocks.len());
        while table.hashes.len() < full {
            let index = table.hashes.len();
            let parent = table.hashes.last().copied().or(table.root);
            let chunk = &tokens[index * self.block_size..(index + 1) * self.block_size];
            let hash = block_hash(parent, chunk);
            let id = table.blocks[index];
            // Another sequence may have computed the same block first; keep that one as the
            // cached copy and leave ours private (it returns to the free list when released).
            if let std::collections::hash_map::Entry::Vacant(slot) = self.by_hash.entry(hash) {
                slot.insert(id);
                self.meta[id as usize].cached = Some(CachedKey {
                    hash,
                    parent,
                    tokens: chunk.to_vec(),
                });
                self.touch(hash);
            }
            table.hashes.push(hash);
        }
    }

    /// Releases every block of `table` and empties it. Cached blocks stay findable until evicted;
    /// a sequence's last blocks are evicted before its first ones, which other prompts share more.
    pub fn free(&mut self, table: &mut BlockTable) {
        for &id in table.blocks.iter().rev() {
            let meta = &mut self.meta[id as usize];
            debug_assert!(meta.ref_count > 0, "block {id} freed twice");
            meta.ref_count -= 1;
            if meta.ref_count > 0 {
                continue;
            }
            if meta.cached.is_some() {
                self.tick += 1;
                meta.lru_tick = Some(self.tick);
                self.evictable.insert(self.tick, id);
            } else {
                self.free.push_back(id);
            }
        }
        table.blocks.clear();
        table.hashes.clear();
    }
}

/// Blocks of `block_size` tokens that fit in `budget` bytes, given the cache's bytes per block.
pub fn blocks_for_budget(budget: u64, bytes_per_block: usize) -> usize {
    if bytes_per_block == 0 {
        return 0;
    }
    (budget / bytes_per_block as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, offset: u32) -> Vec<u32> {
        (0..n as u32).map(|t| t + offset).collect()
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut manager = BlockManager::new(4, 4, true);
        let mut table = BlockTable::default();
        manager.ensure_capacity(&mut table, 9).unwrap();
        assert_eq!(table.blocks().len(), 3);
        let mut other = BlockTable::default();
        let err = manager.ensure_capacity(&mut other, 8).unwrap_err();
        assert_eq!(
            err,
            OutOfBlocks {
                needed: 2,
                available: 1
            }
        );
        assert!(other.is_empty());
        assert_eq!(manager.num_available_blocks(), 1);
        manager.free(&mut table);
        assert_eq!(manager.num_available_blocks(), 4);
        assert_eq!(manager.usage_ratio(), 0.0);
    }

    #[test]
    fn common_prefix_shares_full_blocks_only() {
        let mut manager = BlockManager::new(16, 4, true);
        let prompt = tokens(10, 100);
        let mut first = BlockTable::default();
        assert_eq!(manager.acquire_prefix(&mut first, &prompt), 0);
        manager.ensure_capacity(&mut first, prompt.len()).unwrap();
        manager.register_full_blocks(&mut first, &prompt, prompt.len());

        let mut second_prompt = prompt[..8].to_vec();
        second_prompt.extend([7, 7, 7]);
        let mut second = BlockTable::default();
        assert_eq!(manager.cached_prefix_len(&second_prompt, None), 8);
        assert_eq!(manager.acquire_prefix(&mut second, &second_prompt), 8);
        assert_eq!(second.blocks(), &first.blocks()[..2]);
        manager
            .ensure_capacity(&mut second, second_prompt.len())
            .unwrap();
        assert_ne!(second.blocks()[2], first.blocks()[2]);
        // Shared blocks are counted once.
        assert_eq!(manager.num_used_blocks(), 4);
    }

    #[test]
    fn a_fully_cached_prompt_still_leaves_its_last_token_to_compute() {
        let mut manager = BlockManager::new(8, 4, true);
        let prompt = tokens(8, 0);
        let mut table = BlockTable::default();
        manager.ensure_capacity(&mut table, 8).unwrap();
        manager.register_full_blocks(&mut table, &prompt, 8);
        assert_eq!(manager.cached_prefix_len(&prompt, None), 4);
    }

    #[test]
    fn different_parents_do_not_match() {
        let mut manager = BlockManager::new(8, 2, true);
        let prompt = vec![1, 2, 3, 4, 5];
        let mut table = BlockTable::default();
        manager.ensure_capacity(&mut table, 5).unwrap();
        manager.register_full_blocks(&mut table, &prompt, 5);
        // Same second block, different first block: nothing is shared.
        assert_eq!(manager.cached_prefix_len(&[9, 9, 3, 4, 5], None), 0);
        assert_eq!(manager.cached_prefix_len(&[1, 2, 3, 4, 6], None), 4);
    }

    #[test]
    fn a_cache_salt_keeps_prefixes_apart() {
        let mut manager = BlockManager::new(16, 2, true);
        let prompt = tokens(5, 1);
        for salt in [None, Some("tenant-a")] {
            let mut table = BlockTable::salted(salt);
            manager.ensure_capacity(&mut table, 5).unwrap();
            manager.register_full_blocks(&mut table, &prompt, 5);
        }
        assert_eq!(manager.cached_prefix_len(&prompt, None), 4);
        assert_eq!(manager.cached_prefix_len(&prompt, Some("tenant-a")), 4);
        assert_eq!(manager.cached_prefix_len(&prompt, Some("tenant-b")), 0);
        let mut table = BlockTable::salted(Some("tenant-b"));
        assert_eq!(manager.acquire_prefix(&mut table, &prompt), 0);
        let mut table = BlockTable::salted(Some("tenant-a"));
        assert_eq!(manager.acquire_prefix(&mut table, &prompt), 4);
        // A freed table keeps its salt: a preempted request recomputes under it.
        manager.free(&mut table);
        assert_eq!(manager.acquire_prefix(&mut table, &prompt), 4);
    }

    #[test]
    fn freed_cached_blocks_survive_until_evicted_least_recently_used_first() {
        let mut manager = BlockManager::new(4, 2, true);
        let a = vec![1, 2, 3, 4, 0];
        let mut table_a = BlockTable::default();
        manager.ensure_capacity(&mut table_a, a.len()).unwrap();
        manager.register_full_blocks(&mut table_a, &a, 4);
        manager.free(&mut table_a);
        assert_eq!(manager.num_available_blocks(), 4);
        assert_eq!(manager.cached_prefix_len(&a, None), 4);

        // Taking two blocks uses the never-cached free ones first, then evicts the tail of `a`.
        let mut table_b = BlockTable::default();
        manager.ensure_capacity(&mut table_b, 6).unwrap();
        assert_eq!(manager.cached_prefix_len(&a, None), 2);
        manager.free(&mut table_b);

        // A hit takes the block out of the eviction order.
        let mut table_c = BlockTable::default();
        assert_eq!(manager.acquire_prefix(&mut table_c, &a), 2);
        let mut table_d = BlockTable::default();
        manager.ensure_capacity(&mut table_d, 6).unwrap();
        assert!(manager.ensure_capacity(&mut table_d, 8).is_err());
        assert_eq!(manager.cached_prefix_len(&a, None), 2);
    }

    #[test]
    fn disabled_prefix_caching_never_shares() {
        let mut manager = BlockManager::new(8, 2, false);
        let prompt = vec![1, 2, 3, 4, 5];
        let mut table = BlockTable::default();
        manager.ensure_capacity(&mut table, 5).unwrap();
        manager.register_full_blocks(&mut table, &prompt, 5);
        assert_eq!(manager.cached_prefix_len(&prompt, None), 0);
        manager.free(&mut table);
        assert_eq!(manager.num_available_blocks(), 8);
    }

    #[test]
    fn duplicate_computation_keeps_one_cached_copy() {
        let mut manager = BlockManager::new(8, 2, true);
        let prompt = vec![1, 2, 3];
        let mut first = BlockTable::default();
        let mut second = BlockTable::default();
        manager.ensure_capacity(&mut first, 3).unwrap();
        manager.ensure_capacity(&mut second, 3).unwrap();
        manager.register_full_blocks(&mut first, &prompt, 3);
        manager.register_full_blocks(&mut second, &prompt, 3);
        let first_block = first.blocks()[0];
        manager.free(&mut second);
        manager.free(&mut first);
        assert_eq!(manager.num_available_blocks(), 8);
        assert_eq!(manager.cached_prefix_len(&prompt, None), 2);
        let mut third = BlockTable::default();
        assert_eq!(manager.acquire_prefix(&mut third, &prompt), 2);
        assert_eq!(third.blocks()[0], first_block);
    }

    #[test]
    fn recorded_changes_are_the_net_effect_since_the_last_report() {
        let mut manager = BlockManager::new(2, 2, true);
        // Nothing is recorded until someone watches.
        let mut table = BlockTable::default();
        manager.ensure_capacity(&mut table, 3).unwrap();
        manager.register_full_blocks(&mut table, &[1, 2, 3], 3);
        assert!(manager.take_cache_changes().is_empty());
        let first = block_hash(None, &[1, 2]);
        assert_eq!(manager.cached_hashes(), vec![first]);

        manager.record_cache_changes(true);
        manager.free(&mut table);
        // Taking both blocks evicts the cached one; cached again before the report, it is added.
        manager.ensure_capacity(&mut table, 4).unwrap();
        manager.register_full_blocks(&mut table, &[1, 2, 5, 6], 4);
        let second = block_hash(Some(first), &[5, 6]);
        let mut changes = manager.take_cache_changes();
        changes.added.sort_unstable();
        let mut expected = vec![first, second];
        expected.sort_unstable();
        assert_eq!(changes.added, expected);
        assert!(changes.removed.is_empty());

        manager.free(&mut table);
        let mut other = BlockTable::default();
        manager.ensure_capacity(&mut other, 2).unwrap();
        assert_eq!(
            manager.take_cache_changes(),
            CacheChanges {
                added: vec![],
                removed: vec![second],
            }
        );
        manager.record_cache_changes(false);
        manager.free(&mut other);
        manager.ensure_capacity(&mut other, 4).unwrap();
        assert!(manager.take_cache_changes().is_empty());
    }

    #[test]
    fn cache_blocks_from_a_budget() {
        assert_eq!(blocks_for_budget(64 << 20, 1 << 20), 64);
        assert_eq!(blocks_for_budget(100, 1000), 0);
        assert_eq!(blocks_for_budget(100, 0), 0);
    }
}
