//! `RunExperts` as a shard receives it from a peer: any bytes decode into a request or a decode
//! error, and a decoded request becomes a dispatch plan or INVALID_ARGUMENT /
//! FAILED_PRECONDITION, never a panic or work beyond rows x experts held.
#![no_main]

use std::sync::OnceLock;

use latentserve_proto::v1::RunExpertsRequest;
use latentserve_worker::experts::placement::Placement;
use latentserve_worker::experts::service::{ShardIdentity, plan_for_request};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const HIDDEN_SIZE: usize = 8;
const NUM_LAYERS: usize = 4;

fn identity() -> &'static ShardIdentity {
    static IDENTITY: OnceLock<ShardIdentity> = OnceLock::new();
    IDENTITY.get_or_init(|| ShardIdentity {
        rank: 1,
        placement: Placement::default_for(16, 4, 2).expect("16 experts on 2 shards"),
        fingerprint: "fuzz".to_owned(),
        model_name: "fuzz".to_owned(),
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut request) = RunExpertsRequest::decode(data) else {
        return;
    };
    // Half the inputs carry the right fingerprint, so the checks past it are reached.
    if data.first().is_some_and(|b| b % 2 == 0) {
        request.fingerprint = "fuzz".to_owned();
    }
    if let Ok((hidden, plan)) = plan_for_request(&request, identity(), HIDDEN_SIZE, NUM_LAYERS) {
        let rows = hidden.len() / HIDDEN_SIZE;
        for work in &plan.works {
            assert!(work.rows.iter().all(|&r| (r as usize) < rows));
        }
    }
});
