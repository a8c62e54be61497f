//! A weights file as the loader maps it: any bytes in `model.safetensors` open as an index or an
//! error naming the file, and every tensor it lists loads or fails with an error, never a panic
//! or a read outside the file.
#![no_main]

use std::sync::OnceLock;

use candle_core::DType;
use latentserve_worker::model::loader::WeightStore;
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
}

fuzz_target!(|data: &[u8]| {
    let dir = dir().path();
    std::fs::write(dir.join("model.safetensors"), data).expect("writing the input");
    let Ok(store) = WeightStore::open(dir) else {
        return;
    };
    let names: Vec<String> = store.names().map(str::to_owned).collect();
    for name in names.iter().take(16) {
        let Some(shape) = store.shape(name).map(<[usize]>::to_vec) else {
            continue;
        };
        // Bounded: a header may declare any shape; the loader must check it against the file.
        if shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .is_none_or(|n| n > 1 << 20)
        {
            continue;
        }
        let _ = store.load(name, &shape, DType::F32);
        if let Some(&len) = shape.first()
            && shape.len() == 1
        {
            let _ = store.load_vec(name, len);
        }
    }
});
