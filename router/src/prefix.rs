//! A request's routing key: the chained hashes of its prompt's cache blocks, exactly as the worker
//! will key them, so that they can be looked up in the workers' cache reports.
//!
//! The router tokenizes with the worker's own tokenizer and chat template (fetched from a worker,
//! [`PromptFiles`]) and hashes with the worker's own function
//! ([`latentserve_worker::engine::blocks::block_hash`]). Until the files have arrived, or for a
//! prompt the worker will refuse, the key falls back to a hash of the prompt's leading bytes:
//! still consistent for equal prompts, just not comparable with the reports.

use std::hash::{DefaultHasher, Hash, Hasher};

use latentserve_proto::v1::{GenerateRequest, PromptFiles, generate_request};
use latentserve_worker::engine::blocks::{block_hash, salt_hash};
use latentserve_worker::engine::codec::TokenCodec;
use latentserve_worker::model::Tokenizer;
use latentserve_worker::model::chat_template::{ChatMessage, ChatTemplate};
use latentserve_worker::server::chat::render_conversation;
use latentserve_worker::server::openai::protocol::{ChatMessageInput, PromptInput};
use latentserve_worker::server::openai::translate::chat_message;
use serde::Deserialize;

/// Prompt text the key is computed over: longer prompts are keyed by their first this many bytes
/// (their first blocks are what other requests can share, and tokenizing megabytes per request
/// would slow every request behind it).
pub const MAX_KEY_TEXT_BYTES: usize = 64 << 10;

/// Bytes of prompt text hashed for the fallback key.
const FALLBACK_KEY_BYTES: usize = 256;

/// What the router looks up for a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteKey {
    /// Chained hashes of the prompt's shareable full blocks, as the worker computes them (empty
    /// when the prompt's tokens are not known).
    pub blocks: Vec<u64>,
    /// The rendezvous-hashing key: the first block's hash, or a hash of the prompt's start.
    pub affinity: u64,
    /// The prompt's length in tokens, and tokens per block (both 0 when the tokens are not
    /// known): what an endpoint holding `n` of `blocks` still has to compute is
    /// `prompt_tokens - n * block_tokens`.
    pub prompt_tokens: usize,
    pub block_tokens: usize,
}

impl RouteKey {
    /// A key from the start of the prompt's text or ids alone.
    fn fallback(prompt: impl Hash) -> Self {
        let mut hasher = DefaultHasher::new();
        prompt.hash(&mut hasher);
        Self {
            affinity: hasher.finish(),
            ..Self::default()
        }
    }

    /// Tokens of the prompt an endpoint holding its first `cached_blocks` blocks must compute.
    pub fn uncached_tokens(&self, cached_blocks: usize) -> usize {
        self.prompt_tokens
            .saturating_sub(cached_blocks * self.block_tokens)
    }
}

/// The worker's tokenizer, chat template and block layout.
pub struct Prompter {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    model: String,
    block_size: usize,
    prefix_caching: bool,
}

impl std::fmt::Debug for Prompter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompter")
            .field("model", &self.model)
            .field("block_size", &self.block_size)
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

/// The prompt files a worker sent could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PrompterError {
    #[error("the worker's tokenizer.json does not load: {0}")]
    Tokenizer(String),
    #[error("the worker's chat template does not compile: {0}")]
    Template(String),
    #[error("the worker reports a block size of 0")]
    BlockSize,
}

impl Prompter {
    pub fn from_files(files: &PromptFiles) -> Result<Self, PrompterError> {
        if files.block_size == 0 {
            return Err(PrompterError::BlockSize);
        }
        let tokenizer = Tokenizer::from_bytes(
            &files.tokenizer_json,
            files.eos_token_ids.clone(),
            files.bos_token_id,
        )
        .map_err(|e| PrompterError::Tokenizer(e.to_string()))?;
        let template = if files.chat_template.is_empty() {
            None
        } else {
            let special = files
                .special_tokens
                .iter()
                .map(|t| (t.name.clone(), t.content.clone()))
                .collect();
            Some(
                ChatTemplate::new(
                    files.chat_template.clone(),
                    "the worker's template",
                    special,
                )
                .map_err(|e| PrompterError::Template(e.to_string()))?,
            )
        };
        Ok(Self {
            tokenizer,
            template,
            model: files.model.clone(),
            block_size: files.block_size as usize,
            prefix_caching: files.prefix_caching,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The key of a prompt's token ids under a cache salt ("" or `None`: unsalted).
    pub fn key_for_ids(&self, ids: &[u32], salt: Option<&str>) -> RouteKey {
        let mut blocks = Vec::new();
        // The worker leaves the last token to compute, so only these blocks can ever be shared.
        let shareable = ids.len().saturating_sub(1) / self.block_size;
        let mut parent = salt.filter(|s| !s.is_empty()).map(salt_hash);
        if self.prefix_caching {
            for chunk in ids.chunks_exact(self.block_size).take(shareable) {
                let hash = block_hash(parent, chunk);
                blocks.push(hash);
                parent = Some(hash);
            }
        }
        let affinity = match blocks.first() {
            Some(&first) => first,
            None => RouteKey::fallback((salt, ids)).affinity,
        };
        RouteKey {
            blocks,
            affinity,
            prompt_tokens: ids.len(),
            block_tokens: self.block_size,
        }
    }

    /// The key of a text prompt, tokenized as the worker does (special tokens added).
    fn key_for_text(&self, text: &str, salt: Option<&str>) -> Option<RouteKey> {
        let (text, truncated) = key_text(text);
        let ids = self.tokenizer.encode(text, true).ok()?;
        let mut key = self.key_for_ids(&ids, salt);
        if truncated {
            // The cut may have split a token: the last block is not the worker's.
            key.blocks.pop();
        }
        Some(key)
    }

    fn key_for_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        salt: Option<&str>,
    ) -> Option<RouteKey> {
        let prompt = render_conversation(
            self.template.as_ref(),
            &self.model,
            messages,
            add_generation_prompt,
            &self.tokenizer as &dyn TokenCodec,
            "messages",
        )
        .ok()?;
        Some(self.key_for_ids(&prompt.ids, salt))
    }

    /// The key of a gRPC `Generate` request.
    pub fn key_for_generate(&self, request: &GenerateRequest) -> RouteKey {
        let salt = Some(request.cache_salt.as_str());
        let key = match &request.prompt {
            Some(generate_request::Prompt::Text(text)) => self.key_for_text(text, salt),
            Some(generate_request::Prompt::TokenIds(ids)) => Some(self.key_for_ids(&ids.ids, salt)),
            Some(generate_request::Prompt::Chat(chat)) => {
                let messages: Vec<ChatMessage> = chat
                    .messages
                    .iter()
                    .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                    .collect();
                self.key_for_chat(&messages, chat.add_generation_prompt.unwrap_or(true), salt)
            }
            None => None,
        };
        key.unwrap_or_else(|| generate_fallback(request))
    }

    /// The key of an OpenAI request body (`/v1/completions` or `/v1/chat/completions`).
    pub fn key_for_openai(&self, body: &[u8]) -> RouteKey {
        let Ok(fields) = serde_json::from_slice::<OpenAiPrompt>(body) else {
            return openai_fallback(body);
        };
        let salt = fields.cache_salt.as_deref();
        let key = match (&fields.prompt, fields.messages) {
            (Some(prompt), _) => match prompt {
                PromptInput::Text(text) => self.key_for_text(text, salt),
                PromptInput::Texts(texts) => texts.first().and_then(|t| self.key_for_text(t, salt)),
                PromptInput::Ids(ids) => Some(self.key_for_ids(ids, salt)),
                PromptInput::IdLists(lists) => lists.first().map(|ids| self.key_for_ids(ids, salt)),
            },
            (None, Some(messages)) => messages
                .into_iter()
                .enumerate()
                .map(|(i, m)| chat_message(i, m).ok())
                .collect::<Option<Vec<_>>>()
                .and_then(|messages| {
                    self.key_for_chat(
                        &messages,
                        fields.add_generation_prompt.unwrap_or(true),
                        salt,
                    )
                }),
            (None, None) => None,
        };
        key.unwrap_or_else(|| openai_fallback(body))
    }
}

/// The fields of an OpenAI request that decide its prompt; the rest is the worker's business.
#[derive(Deserialize)]
struct OpenAiPrompt {
    prompt: Option<PromptInput>,
    messages: Option<Vec<ChatMessageInput>>,
    add_generation_prompt: Option<bool>,
    cache_salt: Option<String>,
}

/// At most [`MAX_KEY_TEXT_BYTES`] of `text`, cut at a character boundary, and whether it was cut.
fn key_text(text: &str) -> (&str, bool) {
    if text.len() <= MAX_KEY_TEXT_BYTES {
        return (text, false);
    }
    let mut end = MAX_KEY_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

fn leading(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len().min(FALLBACK_KEY_BYTES)]
}

/// The key of a `Generate` request without the worker's tokenizer.
pub fn generate_fallback(request: &GenerateRequest) -> RouteKey {
    match &request.prompt {
        Some(generate_request::Prompt::Text(text)) => {
            RouteKey::fallback((&request.cache_salt, leading(text.as_bytes())))
        }
        Some(generate_request::Prompt::TokenIds(ids)) => RouteKey::fallback((
            &request.cache_salt,
            &ids.ids[..ids.ids.len().min(FALLBACK_KEY_BYTES)],
        )),
        Some(generate_request::Prompt::Chat(chat)) => RouteKey::fallback((
            &request.cache_salt,
            chat.messages
                .first()
                .map(|m| (m.role.as_str(), leading(m.content.as_bytes()))),
        )),
        None => RouteKey::default(),
    }
}

/// The key of an OpenAI body without the worker's tokenizer: where the prompt starts in the
/// body is unknown, so the body's leading bytes after the first `"prompt"` or `"messages"` key.
pub fn openai_fallback(body: &[u8]) -> RouteKey {
    let start = [&b"\"messages\""[..], &b"\"prompt\""[..]]
        .iter()
        .filter_map(|needle| body.windows(needle.len()).position(|w| w == *needle))
        .min()
        .unwrap_or(0);
    RouteKey::fallback(leading(&body[start..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use latentserve_proto::v1::{ChatMessage as PbChatMessage, Conversation, TokenIds};
    use latentserve_worker::engine::blocks::{BlockManager, BlockTable};

    fn demo_files() -> PromptFiles {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
        PromptFiles {
            model: "demo".into(),
            tokenizer_json: std::fs::read(dir.join("tokenizer.json")).unwrap(),
            eos_token_ids: vec![2],
            bos_token_id: Some(1),
            chat_template: std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap(),
            special_tokens: vec![latentserve_proto::v1::SpecialToken {
                name: "bos_token".into(),
                content: "<s>".into(),
            }],
            block_size: 4,
            prefix_caching: true,
            max_seq_len: 256,
        }
    }

    /// What a worker's block manager finds cached for `ids` after it ran `cached`.
    fn worker_cached_blocks(cached: &[u32], ids: &[u32], salt: Option<&str>) -> usize {
        let mut manager = BlockManager::new(64, 4, true);
        let mut table = BlockTable::salted(salt);
        manager.ensure_capacity(&mut table, cached.len()).unwrap();
        manager.register_full_blocks(&mut table, cached, cached.len());
        manager.cached_prefix_len(ids, salt) / 4
    }

    #[test]
    fn keys_are_the_workers_block_hashes() {
        let prompter = Prompter::from_files(&demo_files()).unwrap();
        let ids: Vec<u32> = (10..30).collect();
        let key = prompter.key_for_ids(&ids, None);
        // 20 tokens, block size 4: the worker shares at most (20 - 1) / 4 = 4 blocks.
        assert_eq!(key.blocks.len(), 4);
        assert_eq!(key.affinity, key.blocks[0]);
        let mut manager = BlockManager::new(64, 4, true);
        let mut table = BlockTable::default();
        manager.ensure_capacity(&mut table, ids.len()).unwrap();
        manager.register_full_blocks(&mut table, &ids, ids.len());
        let mut cached = manager.cached_hashes();
        cached.sort_unstable();
        for hash in &key.blocks {
            assert!(cached.binary_search(hash).is_ok());
        }
        // A salt changes every hash, as in the worker.
        let salted = prompter.key_for_ids(&ids, Some("tenant"));
        assert!(salted.blocks.iter().all(|h| !key.blocks.contains(h)));
        assert_eq!(worker_cached_blocks(&ids, &ids, Some("tenant")), 4);
        assert_eq!(prompter.key_for_ids(&ids, Some("")), key);
    }

    #[test]
    fn text_chat_and_openai_forms_of_one_prompt_agree_with_the_worker_tokenizer() {
        let prompter = Prompter::from_files(&demo_files()).unwrap();
        let question = "What is 12 plus 30? And what is 30 plus 12, twice over?";
        let ids = prompter.tokenizer.encode(question, true).unwrap();
        let by_ids = prompter.key_for_ids(&ids, None);
        assert!(!by_ids.blocks.is_empty());
        let text = GenerateRequest {
            prompt: Some(generate_request::Prompt::Text(question.into())),
            ..GenerateRequest::default()
        };
        assert_eq!(prompter.key_for_generate(&text), by_ids);
        let token_ids = GenerateRequest {
            prompt: Some(generate_request::Prompt::TokenIds(TokenIds {
                ids: ids.clone(),
            })),
            ..GenerateRequest::default()
        };
        assert_eq!(prompter.key_for_generate(&token_ids), by_ids);
        let body = serde_json::json!({"model": "demo", "prompt": question, "max_tokens": 4});
        assert_eq!(prompter.key_for_openai(body.to_string().as_bytes()), by_ids);
        // The demo template renders one user turn as BOS + the question.
        let chat = GenerateRequest {
            prompt: Some(generate_request::Prompt::Chat(Conversation {
                messages: vec![PbChatMessage {
                    role: "user".into(),
                    content: question.into(),
                }],
                add_generation_prompt: None,
            })),
            ..GenerateRequest::default()
        };
        let chat_body = serde_json::json!({"messages": [{"role": "user", "content": question}]});
        let chat_key = prompter.key_for_generate(&chat);
        assert_eq!(
            prompter.key_for_openai(chat_body.to_string().as_bytes()),
            chat_key
        );
        assert_eq!(chat_key.blocks[0], by_ids.blocks[0]);
    }

    #[test]
    fn prompts_the_router_cannot_tokenize_still_get_a_consistent_key() {
        let prompter = Prompter::from_files(&demo_files()).unwrap();
        let not_json = b"{\"prompt\": \"abc\"";
        assert_eq!(
            prompter.key_for_openai(not_json),
            prompter.key_for_openai(not_json)
        );
        assert!(prompter.key_for_openai(not_json).blocks.is_empty());
        let a = openai_fallback(br#"{"model":"x","prompt":"same start"}"#);
        let b = openai_fallback(br#"{"model":"y","prompt":"same start"}"#);
        assert_eq!(a, b, "the key starts at the prompt, not at the model name");
        // An empty request has no blocks either way.
        assert!(
            prompter
                .key_for_generate(&GenerateRequest::default())
                .blocks
                .is_empty()
        );
    }

    #[test]
    fn long_texts_are_keyed_by_their_start() {
        let prompter = Prompter::from_files(&demo_files()).unwrap();
        let long = "ab".repeat(MAX_KEY_TEXT_BYTES);
        let longer = format!("{long} and then some");
        let key = prompter.key_for_text(&long, None).unwrap();
        assert_eq!(key, prompter.key_for_text(&longer, None).unwrap());
        let accents = "é".repeat(MAX_KEY_TEXT_BYTES);
        let (cut, truncated) = key_text(&accents);
        assert!(truncated && cut.len() <= MAX_KEY_TEXT_BYTES);
    }

    #[test]
    fn bad_prompt_files_are_refused_by_name() {
        let mut files = demo_files();
        files.block_size = 0;
        assert!(matches!(
            Prompter::from_files(&files),
            Err(PrompterError::BlockSize)
        ));
        let mut files = demo_files();
        files.tokenizer_json = b"not json".to_vec();
        assert!(matches!(
            Prompter::from_files(&files),
            Err(PrompterError::Tokenizer(_))
        ));
    }
}
