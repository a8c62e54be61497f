//! latentserve worker library: the DeepSeek-V2/V3 model core, the serving engine, expert
//! parallelism, the gRPC and HTTP servers, and the command-line front end. The binary
//! `latentserve-worker` is a thin wrapper over [`cli`].

pub mod cli;
pub mod device;
pub mod engine;
pub mod experts;
pub mod model;
pub mod server;
