//! latentserve-router: one per ModelDeployment, in front of its workers. Each request goes to the
//! worker that holds the longest cached prefix of its prompt, within bounded loads; workers report
//! their cache blocks and load over `latentserve.v1.WorkerStatus`.
//!
//! - [`policy`]: the choice, as pure functions;
//! - [`prefix`]: a request's cache-block hashes, computed as the worker does;
//! - [`pool`]: the endpoints and what each reports; [`discovery`]: where they are;
//! - [`grpc`], [`openai`]: the two APIs, forwarding with retries before the first token;
//! - [`server`]: ports, probes and drain; [`metrics`]; [`cli`].

pub mod cli;
pub mod discovery;
pub mod grpc;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod pool;
pub mod prefix;
pub mod server;
