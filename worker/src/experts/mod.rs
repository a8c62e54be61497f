//! Expert parallelism: routed experts split across the shards of a serving group.
//!
//! - [`placement`]: which shard holds which expert in each MoE layer, and which replica a token
//!   goes to (pure);
//! - [`wire`]: hidden rows on the wire in f32, f16 or bf16;
//! - [`auth`]: the group's shared token, sent and checked on every Experts call;
//! - [`peers`]: Experts clients of the other shards, with health from periodic handshakes;
//! - [`service`]: the `latentserve.v1.Experts` service that runs this shard's experts for a peer;
//! - [`remote`]: the MoE executor that sends each peer its share of a layer's expert work while
//!   the local experts run, adds what comes back, and re-sends a failed peer's work to replicas.

pub mod auth;
pub mod peers;
pub mod placement;
pub mod remote;
pub mod service;
pub mod shard;
pub mod wire;

use std::io::Read;
use std::path::Path;

/// The health and error service name of the expert exchange.
pub const EXPERTS_SERVICE_NAME: &str = "latentserve.v1.Experts";

/// 64-bit FNV-1a: a stable digest (unlike std's hasher, the same on every build), enough to tell
/// models and placements apart between cooperating shards.
#[derive(Debug, Clone, Copy)]
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate fields, so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

/// Identity of a model directory without reading any tensor data: `config.json`, and the name,
/// size and header (tensor names, dtypes, shapes, offsets) of every `.safetensors` file.
pub fn model_digest(dir: &Path) -> std::io::Result<String> {
    let mut hash = Fnv1a::new();
    let config = dir.join("config.json");
    hash.update(&std::fs::read(&config).map_err(|e| with_path(&config, e))?);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| with_path(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    for path in files {
        let mut file = std::fs::File::open(&path).map_err(|e| with_path(&path, e))?;
        let size = file.metadata().map_err(|e| with_path(&path, e))?.len();
        let mut length = [0u8; 8];
        file.read_exact(&mut length)
            .map_err(|e| with_path(&path, e))?;
        let header_len = u64::from_le_bytes(length).min(size.saturating_sub(8));
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| with_path(&path, e))?;
        hash.update(path.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
        hash.update(&size.to_le_bytes());
        hash.update(&header);
    }
    Ok(format!("{:016x}", hash.0))
}

fn with_path(path: &Path, error: std::io::Error) -> std::io::Error {
    std::io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// The fingerprint shards compare at connect: model identity, placement and shard count.
pub fn fingerprint(model_digest: &str, placement: &placement::Placement) -> String {
    let mut hash = Fnv1a::new();
    hash.update(model_digest.as_bytes());
    hash.update(placement.canonical().as_bytes());
    format!("{model_digest}-{:016x}", hash.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use placement::Placement;

    fn write_model(dir: &Path, config: &str, header: &str) {
        std::fs::write(dir.join("config.json"), config).unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 16]);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    }

    #[test]
    fn the_digest_follows_config_and_headers_and_the_fingerprint_the_placement() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let header = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
        write_model(a.path(), r#"{"hidden_size": 8}"#, header);
        write_model(b.path(), r#"{"hidden_size": 8}"#, header);
        let digest = model_digest(a.path()).unwrap();
        assert_eq!(digest, model_digest(b.path()).unwrap());
        write_model(b.path(), r#"{"hidden_size": 16}"#, header);
        assert_ne!(digest, model_digest(b.path()).unwrap());
        let other_header = r#"{"v":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
        write_model(b.path(), r#"{"hidden_size": 8}"#, other_header);
        assert_ne!(digest, model_digest(b.path()).unwrap());

        let two = Placement::default_for(8, 1, 2, 0, &[1, 2]).unwrap();
        let four = Placement::default_for(8, 1, 4, 0, &[1, 2]).unwrap();
        let mirrored = Placement::default_for(8, 1, 2, 4, &[1, 2]).unwrap();
        assert_eq!(fingerprint(&digest, &two), fingerprint(&digest, &two));
        assert_ne!(fingerprint(&digest, &two), fingerprint(&digest, &four));
        assert_ne!(fingerprint(&digest, &two), fingerprint(&digest, &mirrored));
    }

    #[test]
    fn a_missing_config_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = model_digest(dir.path()).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
