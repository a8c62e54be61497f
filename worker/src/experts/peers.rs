//! The other shards of this serving group, as Experts clients with a health state each.
//!
//! A monitor task handshakes every peer periodically. A peer is usable only when its handshake
//! answered in time, it reports itself ready, has the rank we expect at that address and the
//! same fingerprint (model + placement + shard count) as we do. The group covers the model (this
//! shard may be SERVING) while every expert of every MoE layer is held by this shard or a usable
//! peer: with replicas, a shard keeps serving while a peer is down. Any failure drops the peer's
//! channel, so the next attempt resolves its DNS name again: a StatefulSet pod keeps its name but
//! not its address across restarts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use latentserve_proto::v1::HandshakeRequest;
use latentserve_proto::v1::experts_client::ExpertsClient;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::auth::ExpertsAuth;
use super::placement::Placement;

/// A connection to a peer that signs every call with the group's token.
pub type PeerChannel = InterceptedService<Channel, ExpertsAuth>;

/// Largest RunExperts message either way: a long prefill chunk of a large model's hidden rows.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Timeouts and the probe period of the peer monitor.
#[derive(Debug, Clone, Copy)]
pub struct PeerTimeouts {
    /// DNS resolution plus TCP/HTTP2 connection setup.
    pub connect: Duration,
    /// One handshake or RunExperts call.
    pub rpc: Duration,
    /// Between two handshakes of the monitor.
    pub probe_interval: Duration,
}

impl Default for PeerTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            rpc: Duration::from_secs(30),
            probe_interval: Duration::from_millis(500),
        }
    }
}

/// Why a peer cannot take expert work now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerStatus {
    /// Not contacted yet.
    Connecting,
    Ready,
    /// No connection, or a call failed or timed out.
    Unreachable(String),
    /// Reachable but still loading (or draining).
    NotReady,
    /// Reachable but serving another model, placement or shard layout.
    Mismatch(String),
}

impl PeerStatus {
    pub fn describe(&self) -> String {
        match self {
            PeerStatus::Connecting => "not connected yet".to_owned(),
            PeerStatus::Ready => "ready".to_owned(),
            PeerStatus::Unreachable(reason) => format!("unreachable: {reason}"),
            PeerStatus::NotReady => "not ready (loading or draining)".to_owned(),
            PeerStatus::Mismatch(reason) => format!("refused: {reason}"),
        }
    }
}

/// What a peer said in its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeInfo {
    pub rank: usize,
    pub shard_count: usize,
    pub fingerprint: String,
    pub ready: bool,
    pub model_name: String,
}

/// What we expect of the peer at one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    pub rank: usize,
    pub shard_count: usize,
    pub fingerprint: String,
}

/// Judges a handshake answer (pure).
pub fn judge(expected: &Expectation, answer: &HandshakeInfo) -> PeerStatus {
    if answer.shard_count != expected.shard_count || answer.rank != expected.rank {
        return PeerStatus::Mismatch(format!(
            "it is shard {} of {}, expected shard {} of {}",
            answer.rank, answer.shard_count, expected.rank, expected.shard_count
        ));
    }
    if answer.fingerprint != expected.fingerprint {
        return PeerStatus::Mismatch(format!(
            "it serves model `{}` with fingerprint {}, ours is {} (different model, placement or shard count)",
            answer.model_name, answer.fingerprint, expected.fingerprint
        ));
    }
    if !answer.ready {
        return PeerStatus::NotReady;
    }
    PeerStatus::Ready
}

/// Why a `--peers` list does not fit the shard count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerListError {
    #[error("--peers lists {listed} addresses but --shard-count is 1")]
    PeersWithoutShards { listed: usize },
    #[error("--peers: `{0}` is not HOST:PORT")]
    NotHostPort(String),
    #[error(
        "--peers lists {listed} addresses; with --shard-count {shard_count} give all {shard_count} shards in rank order, or the {} others",
        shard_count - 1
    )]
    WrongCount { listed: usize, shard_count: usize },
}

/// Maps `--peers` to ranks: either every shard in rank order (our own entry is skipped), or the
/// other shards in rank order.
pub fn peer_ranks(
    addresses: &[String],
    local_rank: usize,
    shard_count: usize,
) -> Result<Vec<(usize, String)>, PeerListError> {
    if shard_count <= 1 {
        if addresses.is_empty() {
            return Ok(Vec::new());
        }
        return Err(PeerListError::PeersWithoutShards {
            listed: addresses.len(),
        });
    }
    if let Some(bad) = addresses.iter().find(|a| !looks_like_host_port(a)) {
        return Err(PeerListError::NotHostPort(bad.clone()));
    }
    let others = (0..shard_count).filter(|&r| r != local_rank);
    if addresses.len() == shard_count {
        Ok(others.map(|r| (r, addresses[r].clone())).collect())
    } else if addresses.len() == shard_count - 1 {
        Ok(others.zip(addresses.iter().cloned()).collect())
    } else {
        Err(PeerListError::WrongCount {
            listed: addresses.len(),
            shard_count,
        })
    }
}

fn looks_like_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// What the peers allow this shard to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupHealth {
    /// Peers that are ready with our fingerprint.
    pub usable_peers: usize,
    /// Peers in `--peers` (the shard count minus one).
    pub peers: usize,
    /// Every expert of every MoE layer is held by this shard or a usable peer: every token can
    /// be served.
    pub covered: bool,
}

impl GroupHealth {
    /// Every peer is usable (true without peers).
    pub fn all_usable(&self) -> bool {
        self.usable_peers == self.peers
    }
}

/// A peer whose expert work cannot be run; the message names the shard and its address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expert shard {rank} ({address}) is unavailable: {reason}")]
pub struct PeerUnavailable {
    pub rank: usize,
    pub address: String,
    pub reason: String,
}

/// One other shard.
pub struct Peer {
    pub rank: usize,
    pub address: String,
    state: Mutex<PeerState>,
}

struct PeerState {
    status: PeerStatus,
    channel: Option<Channel>,
}

impl Peer {
    pub fn status(&self) -> PeerStatus {
        self.lock().status.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PeerState> {
        // A panic while holding this lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unavailable(&self, reason: String) -> PeerUnavailable {
        PeerUnavailable {
            rank: self.rank,
            address: self.address.clone(),
            reason,
        }
    }
}

/// Every peer of this shard and the group health derived from them.
pub struct Peers {
    local_rank: usize,
    shard_count: usize,
    /// Which experts each peer holds: whether the usable ones cover the model.
    placement: Placement,
    fingerprint: String,
    timeouts: PeerTimeouts,
    auth: ExpertsAuth,
    peers: Vec<Arc<Peer>>,
    health: watch::Sender<GroupHealth>,
}

impl Peers {
    /// `peers`: (rank, HOST:PORT) of every other shard of `placement`'s group (see
    /// [`peer_ranks`]); `auth` signs every call to them.
    pub fn new(
        local_rank: usize,
        placement: Placement,
        peers: Vec<(usize, String)>,
        fingerprint: String,
        timeouts: PeerTimeouts,
        auth: ExpertsAuth,
    ) -> Self {
        // Nobody contacted yet: covered only if this shard holds everything itself.
        let health = watch::Sender::new(GroupHealth {
            usable_peers: 0,
            peers: peers.len(),
            covered: placement.covered_by(|rank| rank == local_rank),
        });
        Self {
            local_rank,
            shard_count: placement.shard_count(),
            placement,
            fingerprint,
            timeouts,
            auth,
            peers: peers
                .into_iter()
                .map(|(rank, address)| {
                    Arc::new(Peer {
                        rank,
                        address,
                        state: Mutex::new(PeerState {
                            status: PeerStatus::Connecting,
                            channel: None,
                        }),
                    })
                })
                .collect(),
            health,
        }
    }

    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    pub fn timeouts(&self) -> PeerTimeouts {
        self.timeouts
    }

    pub fn peers(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    pub fn peer(&self, rank: usize) -> Option<&Arc<Peer>> {
        self.peers.iter().find(|p| p.rank == rank)
    }

    /// The address of peer `rank` as `--peers` gave it (empty for an unknown rank).
    pub fn address(&self, rank: usize) -> String {
        self.peer(rank)
            .map(|p| p.address.clone())
            .unwrap_or_default()
    }

    /// The group's health now.
    pub fn health(&self) -> GroupHealth {
        *self.health.borrow()
    }

    /// Follows [`Self::health`].
    pub fn subscribe(&self) -> watch::Receiver<GroupHealth> {
        self.health.subscribe()
    }

    /// Whether `rank` is a peer that is ready with our fingerprint now.
    pub fn is_usable(&self, rank: usize) -> bool {
        self.peer(rank).is_some_and(|peer| {
            let state = peer.lock();
            state.status == PeerStatus::Ready && state.channel.is_some()
        })
    }

    /// A client for `rank` if it is ready; otherwise why not.
    pub fn client(&self, rank: usize) -> Result<ExpertsClient<PeerChannel>, PeerUnavailable> {
        let Some(peer) = self.peer(rank) else {
            return Err(PeerUnavailable {
                rank,
                address: String::new(),
                reason: "no such peer in --peers".to_owned(),
            });
        };
        let state = peer.lock();
        match (&state.status, &state.channel) {
            (PeerStatus::Ready, Some(channel)) => Ok(ExpertsClient::with_interceptor(
                channel.clone(),
                self.auth.clone(),
            )
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)),
            (status, _) => Err(peer.unavailable(status.describe())),
        }
    }

    /// Records a failed call: the peer is unreachable until a handshake succeeds again.
    pub fn mark_failed(&self, rank: usize, reason: &str) -> PeerUnavailable {
        let Some(peer) = self.peer(rank) else {
            return PeerUnavailable {
                rank,
                address: String::new(),
                reason: reason.to_owned(),
            };
        };
        self.set_status(peer, PeerStatus::Unreachable(reason.to_owned()), None);
        peer.unavailable(format!("unreachable: {reason}"))
    }

    fn set_status(&self, peer: &Peer, status: PeerStatus, channel: Option<Channel>) {
        {
            let mut state = peer.lock();
            if state.status != status {
                match &status {
                    PeerStatus::Ready => {
                        tracing::info!(peer = peer.rank, address = %peer.address, "expert peer ready");
                    }
                    other => tracing::warn!(
                        peer = peer.rank,
                        address = %peer.address,
                        status = %other.describe(),
                        "expert peer not usable"
                    ),
                }
            }
            state.status = status;
            state.channel = channel;
        }
        let usable: Vec<usize> = self
            .peers
            .iter()
            .filter(|p| p.lock().status == PeerStatus::Ready)
            .map(|p| p.rank)
            .collect();
        let health = GroupHealth {
            usable_peers: usable.len(),
            peers: self.peers.len(),
            covered: self
                .placement
                .covered_by(|rank| rank == self.local_rank || usable.contains(&rank)),
        };
        self.health.send_if_modified(|current| {
            let changed = *current != health;
            *current = health;
            changed
        });
    }

    /// Handshakes every peer once, concurrently, and updates their states.
    pub async fn probe_all(&self) {
        let probes = self.peers.iter().map(|peer| self.probe(peer));
        futures::future::join_all(probes).await;
    }

    async fn probe(&self, peer: &Peer) {
        let existing = peer.lock().channel.clone();
        let channel = match existing {
            Some(channel) => channel,
            None => match connect(&peer.address, self.timeouts).await {
                Ok(channel) => channel,
                Err(reason) => {
                    self.set_status(peer, PeerStatus::Unreachable(reason), None);
                    return;
                }
            },
        };
        let mut client = ExpertsClient::with_interceptor(channel.clone(), self.auth.clone());
        let request = HandshakeRequest {
            rank: self.local_rank as u32,
            fingerprint: self.fingerprint.clone(),
        };
        let answer = tokio::time::timeout(self.timeouts.rpc, client.handshake(request)).await;
        let answer = match answer {
            Err(_) => {
                let reason = format!("handshake timed out after {:?}", self.timeouts.rpc);
                self.set_status(peer, PeerStatus::Unreachable(reason), None);
                return;
            }
            Ok(Err(status)) => {
                let reason = format!("handshake failed: {}", status.message());
                self.set_status(peer, PeerStatus::Unreachable(reason), None);
                return;
            }
            Ok(Ok(answer)) => answer.into_inner(),
        };
        let expected = Expectation {
            rank: peer.rank,
            shard_count: self.shard_count,
            fingerprint: self.fingerprint.clone(),
        };
        let info = HandshakeInfo {
            rank: answer.rank as usize,
            shard_count: answer.shard_count as usize,
            fingerprint: answer.fingerprint,
            ready: answer.ready,
            model_name: answer.model_name,
        };
        let status = judge(&expected, &info);
        // Keep the connection of a reachable peer, whatever it said.
        self.set_status(peer, status, Some(channel));
    }

    /// Probes every peer now, then every `probe_interval` until the returned task is aborted.
    pub fn spawn_monitor(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let peers = self.clone();
        tokio::spawn(async move {
            loop {
                peers.probe_all().await;
                tokio::time::sleep(peers.timeouts.probe_interval).await;
            }
        })
    }
}

/// Resolves `address` now (never a cached answer) and connects to the first address that works.
async fn connect(address: &str, timeouts: PeerTimeouts) -> Result<Channel, String> {
    let resolved = tokio::time::timeout(timeouts.connect, tokio::net::lookup_host(address))
        .await
        .map_err(|_| format!("resolving {address} timed out after {:?}", timeouts.connect))?
        .map_err(|e| format!("resolving {address}: {e}"))?;
    let mut last_error = format!("{address} resolved to no address");
    for socket in resolved {
        let endpoint = Endpoint::from_shared(format!("http://{socket}"))
            .map_err(|e| format!("{address}: {e}"))?
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.rpc)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(timeouts.connect);
        match tokio::time::timeout(timeouts.connect, endpoint.connect()).await {
            Ok(Ok(channel)) => return Ok(channel),
            Ok(Err(e)) => last_error = format!("connecting to {address} ({socket}): {e}"),
            Err(_) => {
                last_error = format!(
                    "connecting to {address} ({socket}) timed out after {:?}",
                    timeouts.connect
                )
            }
        }
    }
    Err(last_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expectation() -> Expectation {
        Expectation {
            rank: 1,
            shard_count: 2,
            fingerprint: "abc".to_owned(),
        }
    }

    fn answer() -> HandshakeInfo {
        HandshakeInfo {
            rank: 1,
            shard_count: 2,
            fingerprint: "abc".to_owned(),
            ready: true,
            model_name: "tiny".to_owned(),
        }
    }

    #[test]
    fn a_ready_peer_with_our_fingerprint_is_ready() {
        assert_eq!(judge(&expectation(), &answer()), PeerStatus::Ready);
        let loading = HandshakeInfo {
            ready: false,
            ..answer()
        };
        assert_eq!(judge(&expectation(), &loading), PeerStatus::NotReady);
    }

    #[test]
    fn another_model_rank_or_shard_count_is_refused() {
        let other = HandshakeInfo {
            fingerprint: "def".to_owned(),
            model_name: "other".to_owned(),
            ..answer()
        };
        let PeerStatus::Mismatch(reason) = judge(&expectation(), &other) else {
            panic!("a different fingerprint must be refused");
        };
        assert!(
            reason.contains("`other`") && reason.contains("def"),
            "{reason}"
        );
        // A fingerprint mismatch wins over readiness: a loading peer of another model is refused.
        let other_loading = HandshakeInfo {
            ready: false,
            ..other
        };
        assert!(matches!(
            judge(&expectation(), &other_loading),
            PeerStatus::Mismatch(_)
        ));
        let wrong_rank = HandshakeInfo {
            rank: 0,
            ..answer()
        };
        let PeerStatus::Mismatch(reason) = judge(&expectation(), &wrong_rank) else {
            panic!("a wrong rank must be refused");
        };
        assert!(
            reason.contains("shard 0 of 2, expected shard 1 of 2"),
            "{reason}"
        );
    }

    #[test]
    fn peers_map_to_ranks_from_all_shards_or_the_others() {
        let all: Vec<String> = ["a:1", "b:2", "c:3"].map(String::from).to_vec();
        assert_eq!(
            peer_ranks(&all, 1, 3).unwrap(),
            vec![(0, "a:1".to_owned()), (2, "c:3".to_owned())]
        );
        let others: Vec<String> = ["a:1", "c:3"].map(String::from).to_vec();
        assert_eq!(
            peer_ranks(&others, 1, 3).unwrap(),
            vec![(0, "a:1".to_owned()), (2, "c:3".to_owned())]
        );
        assert!(peer_ranks(&[], 0, 1).unwrap().is_empty());
        let err = peer_ranks(&others[..1], 1, 3).unwrap_err().to_string();
        assert!(err.contains("lists 1 addresses"), "{err}");
        let err = peer_ranks(&["nohost".to_owned()], 0, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`nohost` is not HOST:PORT"), "{err}");
        assert!(peer_ranks(&["a:1".to_owned()], 0, 1).is_err());
    }

    #[tokio::test]
    async fn an_unreachable_peer_keeps_the_group_unhealthy_and_calls_fail_fast() {
        // A port nobody listens on: bind, note the port, close.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let address = format!("127.0.0.1:{port}");
        let peers = Peers::new(
            0,
            Placement::default_for(4, 1, 2, 0, &[1]).unwrap(),
            vec![(1, address.clone())],
            "abc".to_owned(),
            PeerTimeouts {
                connect: Duration::from_millis(500),
                rpc: Duration::from_secs(1),
                probe_interval: Duration::from_millis(50),
            },
            ExpertsAuth::open(),
        );
        let uncovered = GroupHealth {
            usable_peers: 0,
            peers: 1,
            covered: false,
        };
        assert_eq!(peers.health(), uncovered);
        assert_eq!(peers.peer(1).unwrap().status(), PeerStatus::Connecting);
        peers.probe_all().await;
        assert_eq!(peers.health(), uncovered);
        assert!(!peers.is_usable(1));
        assert!(matches!(
            peers.peer(1).unwrap().status(),
            PeerStatus::Unreachable(_)
        ));
        let error = peers.client(1).unwrap_err();
        assert_eq!(error.rank, 1);
        assert!(
            error.to_string().starts_with(&format!(
                "expert shard 1 ({address}) is unavailable: unreachable: connecting to {address}"
            )),
            "{error}"
        );
    }

    #[test]
    fn no_peers_is_healthy() {
        let peers = Peers::new(
            0,
            Placement::default_for(4, 1, 1, 0, &[1]).unwrap(),
            Vec::new(),
            "abc".to_owned(),
            PeerTimeouts::default(),
            ExpertsAuth::open(),
        );
        let health = peers.health();
        assert!(health.covered && health.all_usable());
    }

    #[test]
    fn a_shard_holding_every_expert_itself_is_covered_before_any_peer_answers() {
        // Two shards, each holding everything (a full mirror): either one serves alone.
        let peers = Peers::new(
            0,
            Placement::default_for(4, 1, 2, 4, &[1, 2]).unwrap(),
            vec![(1, "127.0.0.1:1".to_owned())],
            "abc".to_owned(),
            PeerTimeouts::default(),
            ExpertsAuth::open(),
        );
        let health = peers.health();
        assert!(health.covered && !health.all_usable(), "{health:?}");
    }
}
