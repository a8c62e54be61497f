//! The `latentserve-worker` subcommands.
