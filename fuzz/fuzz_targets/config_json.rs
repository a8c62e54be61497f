//! config.json as `serve` reads it: any bytes give a config or an error naming the field, never a
//! panic or an allocation sized by the input; the derived shapes of an accepted config compute.
#![no_main]

use latentserve_worker::model::ModelConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = ModelConfig::from_json(text) {
        let _ = config.qk_head_dim();
        let _ = config.softmax_scale();
        let _ = config.latent_dim();
        let _ = config.kv_cache_values_per_token();
        let _ = config.decompressed_kv_values_per_token();
        for layer in 0..config.num_hidden_layers.min(64) {
            let _ = config.is_moe_layer(layer);
        }
    }
});
