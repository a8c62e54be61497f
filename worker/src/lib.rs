//! latentserve worker library: the DeepSeek-V2/V3 model core, the serving engine, expert
//! parallelism, the gRPC and HTTP servers, and the command-line front end. The binary
//! `latentserve-worker` is a thin wrapper over [`cli`].
//!
//! The modules stack one way; each uses only those below it:
//!
//! ```text
//! cli      the subcommands: flags, and the wiring of everything below (composition root)
//! server   gRPC API, HTTP probes and /metrics, the SIGTERM drain
//! engine   the scheduler's steps over a paged block manager, sampling, detokenization
//! experts  expert parallelism: placement, the Experts service, peers, the sharded MoE
//! model    config, loader, MLA, MoE, RoPE, the latent cache, the forward pass
//! device   `--device cpu|cuda[:N]`: parsing and, with the `cuda` feature, the GPU probe
//! kernels  (crate latentserve-kernels) SIMD kernels and their thread pool
//! metrics  every Prometheus metric, named once; used by any layer above
//! ```

pub mod cli;
pub mod device;
pub mod engine;
pub mod experts;
pub mod metrics;
pub mod model;
pub mod server;
