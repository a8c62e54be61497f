//! The latentserve operator: the `ModelDeployment` CRD and the controller that turns it into
//! worker pods.
//!
//! The reconciler is a pipeline, one module per stage: [`validate`] (spec -> `ValidatedSpec`) ->
//! [`resources`] (pure builders of the typed desired objects) -> [`reconcile::apply`]
//! (server-side apply) -> [`reconcile::prune`] (delete what is owned and no longer desired) ->
//! [`reconcile::update_status`] (conditions computed by [`status`]). [`reconcile`] wires them
//! into the controller. [`worker_args`] and [`router_args`] are the one places that spell the
//! worker's and the router's flags,
//! [`discovery`] adapts the builders to the cluster, [`leader`] elects one active process,
//! [`policy`] holds the installer's allow-lists, [`metrics`] serves Prometheus and health endpoints, [`capacity`] reads the cache figures
//! from a worker, and [`autoscaling`] decides the number of serving groups from the router's
//! signal (`spec.autoscaling`), and [`placement`] balances the routed experts over the shards of
//! each group (`spec.expertPlacement`).

pub mod autoscaling;
pub mod capacity;
pub mod crd;
pub mod discovery;
pub mod http_get;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod policy;
pub mod reconcile;
pub mod resources;
pub mod router_args;
pub mod status;
pub mod validate;
pub mod worker_args;

#[cfg(test)]
mod test_support;
