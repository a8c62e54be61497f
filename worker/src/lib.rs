//! latentserve worker library: the serving engine, the gRPC/HTTP servers and the CLI commands.

pub mod cli;
pub mod engine;
pub mod experts;
pub mod server;
