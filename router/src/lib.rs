//! latentserve-router: one per ModelDeployment, in front of its workers. Each request goes to the
//! worker that holds the longest cached prefix of its prompt, within bounded loads; workers report
//! their cache blocks and load over `latentserve.v1.WorkerStatus`.
//!
//! - [`policy`]: the choice, as pure functions;
//! - [`prefix`]: a request's cache-block hashes, computed as the worker does;
//! - [`pool`]: the endpoints and what each reports; [`discovery`]: where they are;
//!   [`routing`]: which groups the operator drains;
//! - [`hold`]: requests held while no worker can take them (scale from zero);
//! - [`autoscaling`]: the per-group signal an autoscaler reads;
//! - [`grpc`], [`openai`]: the two APIs, forwarding with retries before the first token;
//! - [`server`]: ports, probes and drain; [`metrics`]; [`cli`].

pub mod autoscaling;
pub mod cli;
pub mod discovery;
pub mod grpc;
pub mod hold;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod pool;
pub mod prefix;
pub mod routing;
pub mod server;
