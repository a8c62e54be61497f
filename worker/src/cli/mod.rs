//! The `latentserve-worker` subcommands.

pub mod bench_serve;
