//! A minimal node agent for the end-to-end tests: the part of a kubelet that the test control
//! plane lacks, reduced to what latentserve's worker pods need.
//!
//! The control plane has no scheduler and no kubelet, so pods stay Pending. The agent binds them
//! to its Node and runs each pod's container as a local process of the workspace's own binary.
//! Every pod gets its own loopback address (127.0.0.x) as its pod IP, so that all workers can
//! listen on the same ports side by side, and the headless Service's pod DNS names
//! (`demo-0-1.demo-peers.models.svc`) map to those addresses.
//!
//! This module holds the pure translation from a Pod to a process (command line, environment
//! with downward-API fields, hostPath and emptyDir volumes, bind addresses, peer names) and the
//! readiness check to run against it; [`credentials`] is what a pod that uses a ServiceAccount
//! gets to talk to the API server with; [`runtime`] is the loop that talks to the API server and
//! supervises the processes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

pub mod credentials;
pub mod runtime;

use k8s_openapi::api::core::v1::{Container, EnvVarSource, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The cluster DNS domain that pod names may end with.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Why a pod cannot be run by the agent; each names the pod and the field at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentError {
    #[error("pod {pod}: {field} is missing")]
    Missing { pod: String, field: &'static str },
    #[error("pod {pod}: {field} is not supported by the test node agent ({detail})")]
    Unsupported {
        pod: String,
        field: String,
        detail: String,
    },
    #[error("pod {pod}: no local binary for {what} (known: {known})")]
    NoBinary {
        pod: String,
        what: String,
        known: String,
    },
    #[error("no loopback address left for pod {0} (127.0.0.2 to 127.0.0.254 are taken)")]
    AddressesExhausted(String),
    #[error("pod {pod}: probe port {port} is not a port of the container")]
    UnknownPort { pod: String, port: String },
}

/// Stable loopback addresses for pods, keyed by namespace and pod name.
///
/// A pod keeps its address across restarts of its process and even across deletion and
/// re-creation under the same name, as a StatefulSet pod keeps its DNS name: peers that were
/// given the address at start reach the restarted pod again. Addresses can be handed out
/// before the pod exists, when another pod names it as a peer.
#[derive(Debug, Default)]
pub struct AddressBook {
    assigned: BTreeMap<(String, String), Ipv4Addr>,
}

impl AddressBook {
    /// The address of `namespace/pod`, assigning the next free one (from 127.0.0.2) on first use.
    pub fn address_of(&mut self, namespace: &str, pod: &str) -> Result<Ipv4Addr, AgentError> {
        let key = (namespace.to_owned(), pod.to_owned());
        if let Some(address) = self.assigned.get(&key) {
            return Ok(*address);
        }
        // 127.0.0.1 stays the agent's and the test's own; .255 is the broadcast address.
        let index = self.assigned.len() + 2;
        let last = u8::try_from(index)
            .ok()
            .filter(|&octet| octet < 255)
            .ok_or_else(|| AgentError::AddressesExhausted(format!("{namespace}/{pod}")))?;
        let address = Ipv4Addr::new(127, 0, 0, last);
        self.assigned.insert(key, address);
        Ok(address)
    }

    /// The address already assigned to `namespace/pod`, if any.
    pub fn get(&self, namespace: &str, pod: &str) -> Option<Ipv4Addr> {
        self.assigned
            .get(&(namespace.to_owned(), pod.to_owned()))
            .copied()
    }
}

/// A pod's DNS name under a headless Service, split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDnsName {
    /// The pod's `spec.hostname`, which a StatefulSet sets to the pod's name.
    pub hostname: String,
    /// The headless Service (`spec.subdomain`).
    pub subdomain: String,
    pub namespace: String,
}

impl PodDnsName {
    /// Parses `<hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]]` (with an optional
    /// trailing dot), as resolved from a pod in `default_namespace`. Anything else (IP
    /// addresses, `localhost`, Service names, other domains) is not a pod name: `None`.
    pub fn parse(host: &str, default_namespace: &str) -> Option<Self> {
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.parse::<std::net::IpAddr>().is_ok() {
            return None;
        }
        let labels: Vec<&str> = host.split('.').collect();
        if labels.iter().any(|l| !is_dns_label(l)) {
            return None;
        }
        let domain: Vec<&str> = CLUSTER_DOMAIN.split('.').collect();
        let namespace = match labels.as_slice() {
            [_, _] => default_namespace,
            [_, _, namespace] => namespace,
            [_, _, namespace, "svc"] => namespace,
            [_, _, namespace, "svc", rest @ ..] if rest == domain.as_slice() => namespace,
            _ => return None,
        };
        Some(Self {
            hostname: labels[0].to_owned(),
            subdomain: labels[1].to_owned(),
            namespace: namespace.to_owned(),
        })
    }

    /// The fully qualified name, as cluster DNS would serve it.
    pub fn fqdn(&self) -> String {
        format!(
            "{}.{}.{}.svc.{CLUSTER_DOMAIN}",
            self.hostname, self.subdomain, self.namespace
        )
    }
}

fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Resolves headless-Service pod names to the agent's loopback addresses: the agent's stand-in
/// for cluster DNS. A StatefulSet pod's hostname is its name, so the name alone finds its address.
///
/// Only names under the given headless Service resolve: `example.com` has the shape of
/// `<hostname>.<subdomain>` too, and cluster DNS would not answer it with a pod.
#[derive(Debug)]
pub struct Hosts<'a> {
    book: &'a mut AddressBook,
    /// Namespace of the pod whose names are resolved (for names without one).
    namespace: &'a str,
    /// The headless Service (`spec.subdomain`) whose pod names resolve.
    subdomain: &'a str,
}

impl<'a> Hosts<'a> {
    pub fn new(book: &'a mut AddressBook, namespace: &'a str, subdomain: &'a str) -> Self {
        Self {
            book,
            namespace,
            subdomain,
        }
    }

    /// The address of a pod DNS name under the headless Service, or `None` for other names.
    pub fn resolve(&mut self, host: &str) -> Result<Option<Ipv4Addr>, AgentError> {
        match PodDnsName::parse(host, self.namespace) {
            Some(name) if name.subdomain == self.subdomain && name.namespace == self.namespace => {
                self.book
                    .address_of(&name.namespace, &name.hostname)
                    .map(Some)
            }
            _ => Ok(None),
        }
    }

    /// `host:port` with a pod DNS name replaced by its address; anything else unchanged.
    fn rewrite_host_port(&mut self, endpoint: &str) -> Result<String, AgentError> {
        let Some((host, port)) = endpoint.rsplit_once(':') else {
            return Ok(endpoint.to_owned());
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(endpoint.to_owned());
        }
        Ok(match self.resolve(host)? {
            Some(address) => format!("{address}:{port}"),
            None => endpoint.to_owned(),
        })
    }

    /// A comma-separated list of `host:port` endpoints (`--peers a:1,b:2`) with pod names resolved.
    pub fn rewrite_endpoints(&mut self, value: &str) -> Result<String, AgentError> {
        let parts: Result<Vec<String>, AgentError> = value
            .split(',')
            .map(|part| self.rewrite_host_port(part))
            .collect();
        Ok(parts?.join(","))
    }

    /// `/etc/hosts` lines for the given pod names (each line lists every form of the name), so
    /// that what the agent resolved can be logged or compared with what DNS would have given.
    pub fn hosts_file(&mut self, names: &[PodDnsName]) -> Result<String, AgentError> {
        let mut out = String::new();
        for name in names {
            let address = self.book.address_of(&name.namespace, &name.hostname)?;
            let short = format!("{}.{}", name.hostname, name.subdomain);
            out.push_str(&format!(
                "{address}\t{fqdn} {short}.{ns}.svc {short}.{ns} {short}\n",
                fqdn = name.fqdn(),
                ns = name.namespace
            ));
        }
        Ok(out)
    }
}

/// How to run one pod: the process and where it listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The container's environment only (the caller decides what else the process inherits).
    pub env: Vec<(String, String)>,
    /// The pod's address: every `0.0.0.0:port` listen address was bound to it.
    pub pod_ip: Ipv4Addr,
    /// emptyDir volumes: directories the caller creates before starting the process.
    pub scratch_dirs: Vec<PathBuf>,
}

/// What the agent knows about the pod's surroundings when it starts it.
#[derive(Debug, Clone)]
pub struct Placement<'a> {
    pub node_name: &'a str,
    pub host_ip: Ipv4Addr,
    /// Parent of the pod's emptyDir volumes (`<root>/<namespace>/<pod>/<volume>`).
    pub scratch_root: &'a Path,
    /// Local binaries by command name (`latentserve-worker` -> `target/debug/latentserve-worker`).
    pub binaries: &'a BTreeMap<String, PathBuf>,
    /// hostPath volumes whose node path lives elsewhere on this machine (the examples' demo
    /// model path `/srv/models/latentserve-demo` -> the repository's demo model folder).
    pub host_paths: &'a BTreeMap<String, PathBuf>,
}

/// Translates a pod into a local process: its one container's command and args with `$(VAR)`
/// references expanded, its environment (plain values and downward-API fields), volume mount
/// paths replaced by the host directories behind them, listen addresses bound to the pod's own
/// loopback address, and peer pod names replaced by their addresses.
pub fn process_for_pod(
    pod: &Pod,
    placement: &Placement<'_>,
    book: &mut AddressBook,
) -> Result<ProcessSpec, AgentError> {
    let pod_ref = pod_ref(pod);
    let namespace = pod
        .metadata
        .namespace
        .as_deref()
        .ok_or_else(|| missing(&pod_ref, "metadata.namespace"))?;
    let name = pod
        .metadata
        .name
        .as_deref()
        .ok_or_else(|| missing(&pod_ref, "metadata.name"))?;
    let spec = pod.spec.as_ref().ok_or_else(|| missing(&pod_ref, "spec"))?;
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(unsupported(
            &pod_ref,
            "spec.initContainers",
            "only one container per pod",
        ));
    }
    let container = match spec.containers.as_slice() {
        [container] => container,
        [] => return Err(missing(&pod_ref, "spec.containers")),
        _ => {
            return Err(unsupported(
                &pod_ref,
                "spec.containers",
                "only one container per pod",
            ));
        }
    };
    let pod_ip = book.address_of(namespace, name)?;

    let env = container_env(pod, container, pod_ip, placement)?;
    let (mounts, scratch_dirs) = mount_map(pod, container, placement)?;

    let mut words: Vec<String> = container.command.clone().unwrap_or_default();
    let program_word = if words.is_empty() {
        image_entrypoint(container)
    } else {
        words.remove(0)
    };
    words.extend(container.args.clone().unwrap_or_default());
    let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let program_name = expand_vars(&program_word, &vars);
    let program_base = program_name.rsplit('/').next().unwrap_or(&program_name);
    let program = placement
        .binaries
        .get(program_base)
        .cloned()
        .ok_or_else(|| AgentError::NoBinary {
            pod: pod_ref.clone(),
            what: format!("command {program_name:?}"),
            known: placement
                .binaries
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        })?;

    // Without a subdomain the pod has no DNS name under a headless Service, so nothing resolves.
    let subdomain = spec.subdomain.as_deref().unwrap_or_default();
    let mut hosts = Hosts::new(book, namespace, subdomain);
    let mut localize = |word: &str| -> Result<String, AgentError> {
        let word = map_mount_path(word, &mounts);
        let word = bind_to(&word, pod_ip);
        hosts.rewrite_endpoints(&word)
    };
    let args = words
        .iter()
        .map(|word| localize_flag_value(&expand_vars(word, &vars), &mut localize))
        .collect::<Result<Vec<_>, _>>()?;
    let env = env
        .into_iter()
        .map(|(key, value)| Ok((key, localize(&value)?)))
        .collect::<Result<Vec<_>, AgentError>>()?;

    Ok(ProcessSpec {
        program,
        args,
        env,
        pod_ip,
        scratch_dirs,
    })
}

/// Applies `f` to the value of `--flag=value`, or to the whole word otherwise.
fn localize_flag_value(
    word: &str,
    f: &mut impl FnMut(&str) -> Result<String, AgentError>,
) -> Result<String, AgentError> {
    match word.split_once('=') {
        Some((flag, value)) if flag.starts_with("--") => Ok(format!("{flag}={}", f(value)?)),
        _ => f(word),
    }
}

/// The container's environment in order, each value with `$(VAR)` references to earlier
/// variables expanded, as the kubelet builds it.
fn container_env(
    pod: &Pod,
    container: &Container,
    pod_ip: Ipv4Addr,
    placement: &Placement<'_>,
) -> Result<Vec<(String, String)>, AgentError> {
    let pod_ref = pod_ref(pod);
    let mut env: Vec<(String, String)> = Vec::new();
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(unsupported(&pod_ref, "envFrom", "only env entries"));
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(source)) => downward_value(pod, &var.name, source, pod_ip, placement)?,
            (Some(value), None) => {
                let vars: BTreeMap<&str, &str> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                expand_vars(value, &vars)
            }
            (None, None) => String::new(),
        };
        env.retain(|(key, _)| key != &var.name);
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

/// The value of a downward-API `fieldRef`, as the kubelet would fill it in for this pod.
fn downward_value(
    pod: &Pod,
    var: &str,
    source: &EnvVarSource,
    pod_ip: Ipv4Addr,
    placement: &Placement<'_>,
) -> Result<String, AgentError> {
    let pod_ref = pod_ref(pod);
    let Some(field) = &source.field_ref else {
        return Err(unsupported(
            &pod_ref,
            &format!("env {var}"),
            "only fieldRef sources (no configMapKeyRef, secretKeyRef or resourceFieldRef)",
        ));
    };
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let path = field.field_path.as_str();
    let from_map = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .map(|key| {
                map.as_ref()
                    .and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or_default()
            })
    };
    let value = match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => Some(placement.node_name.to_owned()),
        "spec.serviceAccountName" => Some(
            spec.and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
        ),
        "status.podIP" | "status.podIPs" => Some(pod_ip.to_string()),
        "status.hostIP" | "status.hostIPs" => Some(placement.host_ip.to_string()),
        _ => from_map(&meta.labels, "metadata.labels['")
            .or_else(|| from_map(&meta.annotations, "metadata.annotations['")),
    };
    value.ok_or_else(|| {
        unsupported(
            &pod_ref,
            &format!("env {var} fieldRef {path}"),
            "a downward-API field the agent does not know",
        )
    })
}

/// A container mount path and the host directory behind it.
type MountedDir = (String, PathBuf);

/// Mount path -> host directory for each of the container's volume mounts, and the emptyDir
/// directories to create. hostPath volumes map to their path; emptyDir volumes to a fresh
/// directory of the pod; `subPath` is appended.
fn mount_map(
    pod: &Pod,
    container: &Container,
    placement: &Placement<'_>,
) -> Result<(Vec<MountedDir>, Vec<PathBuf>), AgentError> {
    let pod_ref = pod_ref(pod);
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut mounts = Vec::new();
    let mut scratch = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .ok_or_else(|| {
                unsupported(
                    &pod_ref,
                    &format!("volumeMounts {}", mount.name),
                    "it names no volume of the pod",
                )
            })?;
        let base = if let Some(host) = &volume.host_path {
            placement
                .host_paths
                .get(host.path.trim_end_matches('/'))
                .cloned()
                .unwrap_or_else(|| PathBuf::from(&host.path))
        } else if volume.empty_dir.is_some() {
            let dir = volume_dir(pod, placement.scratch_root, &volume.name);
            scratch.push(dir.clone());
            dir
        } else if volume.secret.is_some() || volume.config_map.is_some() {
            // Written by the agent before the process starts (see [`secret_volumes`] and
            // [`config_map_volumes`]).
            volume_dir(pod, placement.scratch_root, &volume.name)
        } else {
            return Err(unsupported(
                &pod_ref,
                &format!("volume {}", volume.name),
                "only hostPath, emptyDir, secret and configMap volumes",
            ));
        };
        let host = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => base.join(sub),
            None => base,
        };
        mounts.push((mount.mount_path.trim_end_matches('/').to_owned(), host));
    }
    // Longest mount path first, so that /model/cache wins over /model.
    mounts.sort_by_key(|(mount_path, _)| std::cmp::Reverse(mount_path.len()));
    Ok((mounts, scratch))
}

/// The directory of a pod's emptyDir or secret volume: `<root>/<namespace>/<pod>/<volume>`.
fn volume_dir(pod: &Pod, scratch_root: &Path, volume: &str) -> PathBuf {
    scratch_root
        .join(pod.metadata.namespace.as_deref().unwrap_or_default())
        .join(pod.metadata.name.as_deref().unwrap_or_default())
        .join(volume)
}

/// The pod's secret volumes: where the agent writes each one (one file per key, as the kubelet
/// does) and the name of the Secret.
pub fn secret_volumes(pod: &Pod, scratch_root: &Path) -> Vec<(PathBuf, String)> {
    pod.spec
        .iter()
        .flat_map(|spec| spec.volumes.iter().flatten())
        .filter_map(|volume| {
            let secret = volume.secret.as_ref()?.secret_name.clone()?;
            Some((volume_dir(pod, scratch_root, &volume.name), secret))
        })
        .collect()
}

/// The pod's configMap volumes: where the agent writes each one (one file per key) and the
/// name of the ConfigMap.
pub fn config_map_volumes(pod: &Pod, scratch_root: &Path) -> Vec<(PathBuf, String)> {
    pod.spec
        .iter()
        .flat_map(|spec| spec.volumes.iter().flatten())
        .filter_map(|volume| {
            let config_map = volume.config_map.as_ref()?.name.clone();
            Some((volume_dir(pod, scratch_root, &volume.name), config_map))
        })
        .collect()
}

/// A path inside a mount replaced by the same path in the host directory behind the mount.
fn map_mount_path(word: &str, mounts: &[MountedDir]) -> String {
    for (mount_path, host) in mounts {
        if word == mount_path {
            return host.display().to_string();
        }
        if let Some(rest) = word.strip_prefix(mount_path.as_str())
            && let Some(rest) = rest.strip_prefix('/')
        {
            return host.join(rest).display().to_string();
        }
    }
    word.to_owned()
}

/// Wildcard listen addresses (`0.0.0.0:port`, `[::]:port`) bound to the pod's own address.
fn bind_to(word: &str, pod_ip: Ipv4Addr) -> String {
    for wildcard in ["0.0.0.0:", "[::]:"] {
        if let Some(port) = word.strip_prefix(wildcard)
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
        {
            return format!("{pod_ip}:{port}");
        }
    }
    word.to_owned()
}

/// Kubernetes' `$(VAR)` expansion: references to defined variables are replaced, `$$` is a
/// literal `$`, and references to undefined variables are left as they are.
pub fn expand_vars(input: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(after_escape) = after.strip_prefix('$') {
            out.push('$');
            rest = after_escape;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// An image's entrypoint when a container gives no command: the repository's last path
/// segment, which is the binary's name for every latentserve image.
fn image_entrypoint(container: &Container) -> String {
    let image = container.image.as_deref().unwrap_or_default();
    let without_digest = image.split('@').next().unwrap_or_default();
    let last = without_digest.rsplit('/').next().unwrap_or_default();
    let name = last.split(':').next().unwrap_or_default();
    // The CUDA worker image runs the same binary.
    name.strip_suffix("-cuda").unwrap_or(name).to_owned()
}

/// The readiness check the agent runs for a pod, from its container's readiness probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadinessCheck {
    /// `grpc.health.v1.Health/Check` for `service` ("" is the whole server).
    Grpc { address: String, service: String },
    /// HTTP GET answered with 2xx or 3xx.
    Http { address: String, path: String },
    /// A TCP connection accepted.
    Tcp { address: String },
}

/// The pod's readiness check against its own address, or `None` when it has no readiness probe
/// (then it is ready once running, as with a kubelet).
pub fn readiness_check(pod: &Pod, pod_ip: Ipv4Addr) -> Result<Option<ReadinessCheck>, AgentError> {
    let pod_ref = pod_ref(pod);
    let spec = pod.spec.as_ref().ok_or_else(|| missing(&pod_ref, "spec"))?;
    let Some(container) = spec.containers.first() else {
        return Err(missing(&pod_ref, "spec.containers"));
    };
    let Some(probe) = &container.readiness_probe else {
        return Ok(None);
    };
    probe_check(&pod_ref, container, probe, pod_ip).map(Some)
}

fn probe_check(
    pod_ref: &str,
    container: &Container,
    probe: &Probe,
    pod_ip: Ipv4Addr,
) -> Result<ReadinessCheck, AgentError> {
    if let Some(grpc) = &probe.grpc {
        return Ok(ReadinessCheck::Grpc {
            address: format!("{pod_ip}:{}", grpc.port),
            service: grpc.service.clone().unwrap_or_default(),
        });
    }
    if let Some(http) = &probe.http_get {
        let port = container_port(pod_ref, container, &http.port)?;
        return Ok(ReadinessCheck::Http {
            address: format!("{pod_ip}:{port}"),
            path: http.path.clone().unwrap_or_else(|| "/".to_owned()),
        });
    }
    if let Some(tcp) = &probe.tcp_socket {
        let port = container_port(pod_ref, container, &tcp.port)?;
        return Ok(ReadinessCheck::Tcp {
            address: format!("{pod_ip}:{port}"),
        });
    }
    Err(unsupported(
        pod_ref,
        "readinessProbe",
        "only grpc, httpGet and tcpSocket probes",
    ))
}

/// A probe's port, by number or by the name of one of the container's ports.
fn container_port(
    pod_ref: &str,
    container: &Container,
    port: &IntOrString,
) -> Result<i32, AgentError> {
    match port {
        IntOrString::Int(number) => Ok(*number),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .ok_or_else(|| AgentError::UnknownPort {
                pod: pod_ref.to_owned(),
                port: name.clone(),
            }),
    }
}

fn pod_ref(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("?"),
        pod.metadata.name.as_deref().unwrap_or("?")
    )
}

fn missing(pod: &str, field: &'static str) -> AgentError {
    AgentError::Missing {
        pod: pod.to_owned(),
        field,
    }
}

fn unsupported(pod: &str, field: &str, detail: &str) -> AgentError {
    AgentError::Unsupported {
        pod: pod.to_owned(),
        field: field.to_owned(),
        detail: detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A pod as the StatefulSet controller creates it from the operator's template (rank 1 of a
    /// 2-shard group of ModelDeployment `demo` in namespace `models`).
    fn worker_pod(name: &str, model_volume: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": "models",
                "uid": "0b5a7c1e-uid",
                "labels": {"app.kubernetes.io/instance": "demo", "latentserve.io/group": "0"},
            },
            "spec": {
                "hostname": name,
                "subdomain": "demo-peers",
                "containers": [{
                    "name": "worker",
                    "image": "latentserve-worker:0.1.0",
                    "command": ["latentserve-worker"],
                    "args": [
                        "serve", "--model", "/model",
                        "--grpc-addr", "0.0.0.0:50051",
                        "--experts-addr", "0.0.0.0:50052",
                        "--metrics-addr", "0.0.0.0:9090",
                        "--shard-rank-from-pod-name", "--shard-count", "2",
                        "--peers", "demo-0-0.demo-peers.models.svc:50052,demo-0-1.demo-peers.models.svc:50052",
                        "--log-file=/tmp/$(POD_NAME).log",
                        "--tokenizer=/model/tokenizer.json",
                    ],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "GROUP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['latentserve.io/group']"}}},
                        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "WHO", "value": "$(POD_NAMESPACE)/$(POD_NAME) $$(POD_NAME) $(UNDEFINED)"},
                        {"name": "RUST_LOG", "value": "info"},
                    ],
                    "ports": [
                        {"name": "grpc", "containerPort": 50051},
                        {"name": "experts", "containerPort": 50052},
                        {"name": "metrics", "containerPort": 9090},
                    ],
                    "volumeMounts": [
                        {"name": "model", "mountPath": "/model", "readOnly": true},
                        {"name": "tmp", "mountPath": "/tmp"},
                    ],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}},
                }],
                "volumes": [
                    model_volume,
                    {"name": "tmp", "emptyDir": {}},
                ],
            },
        }))
        .expect("a valid pod")
    }

    fn host_path_volume() -> serde_json::Value {
        json!({"name": "model", "hostPath": {"path": "/srv/models/latentserve-demo", "type": "Directory"}})
    }

    fn binaries() -> BTreeMap<String, PathBuf> {
        BTreeMap::from([(
            "latentserve-worker".to_owned(),
            PathBuf::from("/work/target/debug/latentserve-worker"),
        )])
    }

    fn run(pod: &Pod, book: &mut AddressBook) -> Result<ProcessSpec, AgentError> {
        let binaries = binaries();
        let host_paths = BTreeMap::from([(
            "/srv/models/elsewhere".to_owned(),
            PathBuf::from("/work/models/demo"),
        )]);
        let placement = Placement {
            node_name: "test-node",
            host_ip: Ipv4Addr::LOCALHOST,
            scratch_root: Path::new("/tmp/agent"),
            binaries: &binaries,
            host_paths: &host_paths,
        };
        process_for_pod(pod, &placement, book)
    }

    fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
        let at = args.iter().position(|a| a == name).expect("flag present");
        &args[at + 1]
    }

    #[test]
    fn addresses_are_distinct_stable_and_skip_the_agents_own() {
        let mut book = AddressBook::default();
        let a = book.address_of("models", "demo-0-0").unwrap();
        let b = book.address_of("models", "demo-0-1").unwrap();
        let other_namespace = book.address_of("other", "demo-0-0").unwrap();
        assert_eq!(a, Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(b, Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(other_namespace, Ipv4Addr::new(127, 0, 0, 4));
        assert_eq!(book.address_of("models", "demo-0-0").unwrap(), a);
        assert_eq!(book.get("models", "demo-0-1"), Some(b));
        assert_eq!(book.get("models", "demo-0-9"), None);
    }

    #[test]
    fn running_out_of_loopback_addresses_is_an_error_naming_the_pod() {
        let mut book = AddressBook::default();
        for i in 0..253 {
            book.address_of("ns", &format!("pod-{i}")).unwrap();
        }
        assert_eq!(
            book.get("ns", "pod-252"),
            Some(Ipv4Addr::new(127, 0, 0, 254))
        );
        assert_eq!(
            book.address_of("ns", "one-too-many"),
            Err(AgentError::AddressesExhausted("ns/one-too-many".to_owned()))
        );
    }

    #[test]
    fn pod_dns_names_parse_in_every_form_cluster_dns_answers() {
        let want = |ns: &str| PodDnsName {
            hostname: "demo-0-1".to_owned(),
            subdomain: "demo-peers".to_owned(),
            namespace: ns.to_owned(),
        };
        for (host, ns) in [
            ("demo-0-1.demo-peers", "models"),
            ("demo-0-1.demo-peers.other", "other"),
            ("demo-0-1.demo-peers.other.svc", "other"),
            ("demo-0-1.demo-peers.other.svc.cluster.local", "other"),
            ("demo-0-1.demo-peers.other.svc.cluster.local.", "other"),
        ] {
            assert_eq!(PodDnsName::parse(host, "models"), Some(want(ns)), "{host}");
        }
        assert_eq!(
            want("models").fqdn(),
            "demo-0-1.demo-peers.models.svc.cluster.local"
        );
    }

    #[test]
    fn other_hosts_are_not_pod_names() {
        for host in [
            "127.0.0.1",
            "::1",
            "localhost",
            "demo",
            "demo.models.svc.cluster.local.extra",
            "demo-0-1.demo-peers.models.svc.example.com",
            "Demo-0-1.demo-peers",
            "-bad.demo-peers",
            "a..b",
        ] {
            assert_eq!(PodDnsName::parse(host, "models"), None, "{host}");
        }
    }

    #[test]
    fn variable_expansion_follows_kubernetes_rules() {
        let vars = BTreeMap::from([("A", "1"), ("POD_NAME", "demo-0-1")]);
        assert_eq!(expand_vars("$(A)-$(POD_NAME)", &vars), "1-demo-0-1");
        assert_eq!(expand_vars("$$(A) costs $5", &vars), "$(A) costs $5");
        assert_eq!(expand_vars("$(MISSING) stays", &vars), "$(MISSING) stays");
        assert_eq!(expand_vars("unterminated $(A", &vars), "unterminated $(A");
        assert_eq!(expand_vars("trailing $", &vars), "trailing $");
    }

    #[test]
    fn a_worker_pod_becomes_a_local_process_on_its_own_address() {
        let mut book = AddressBook::default();
        let rank0 = book.address_of("models", "demo-0-0").unwrap();
        let spec = run(&worker_pod("demo-0-1", host_path_volume()), &mut book).unwrap();
        let me = Ipv4Addr::new(127, 0, 0, 3);
        assert_eq!(spec.pod_ip, me);
        assert_eq!(
            spec.program,
            PathBuf::from("/work/target/debug/latentserve-worker")
        );
        let args = &spec.args;
        assert_eq!(args[0], "serve");
        assert_eq!(flag(args, "--model"), "/srv/models/latentserve-demo");
        assert_eq!(flag(args, "--grpc-addr"), "127.0.0.3:50051");
        assert_eq!(flag(args, "--experts-addr"), "127.0.0.3:50052");
        assert_eq!(flag(args, "--metrics-addr"), "127.0.0.3:9090");
        assert_eq!(flag(args, "--shard-count"), "2");
        assert_eq!(
            flag(args, "--peers"),
            format!("{rank0}:50052,{me}:50052"),
            "peers resolve to the pods' own addresses, this pod's included"
        );
        assert!(
            args.contains(&"--log-file=/tmp/agent/models/demo-0-1/tmp/demo-0-1.log".to_owned())
        );
        assert!(
            args.contains(&"--tokenizer=/srv/models/latentserve-demo/tokenizer.json".to_owned())
        );
        assert_eq!(
            spec.scratch_dirs,
            vec![PathBuf::from("/tmp/agent/models/demo-0-1/tmp")]
        );

        let env: BTreeMap<&str, &str> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(env["POD_NAME"], "demo-0-1");
        assert_eq!(env["POD_NAMESPACE"], "models");
        assert_eq!(env["POD_IP"], "127.0.0.3");
        assert_eq!(env["GROUP"], "0");
        assert_eq!(env["NODE"], "test-node");
        assert_eq!(env["WHO"], "models/demo-0-1 $(POD_NAME) $(UNDEFINED)");
        assert_eq!(env["RUST_LOG"], "info");
    }

    /// The router pod of the operator's own Deployment for `demo` in `models`.
    fn router_pod() -> Pod {
        use latentserve_operator::crd::ModelDeployment;
        use latentserve_operator::discovery::{Features, KubeVersion};
        use latentserve_operator::resources::{BuildContext, router};
        let md: ModelDeployment = serde_json::from_value(json!({
            "apiVersion": "latentserve.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "demo", "namespace": "models", "uid": "u-md"},
            "spec": {"model": {"hostPath": {"path": "/srv/models/latentserve-demo"}}},
        }))
        .unwrap();
        let ctx = BuildContext {
            worker_image: "latentserve-worker:test".into(),
            router_image: "latentserve-router:test".into(),
            features: Features::from_discovery(KubeVersion::new(1, 20), &[]),
            policy: Default::default(),
        };
        let spec = latentserve_operator::validate::validate(&md, &ctx.features).unwrap();
        let template = router::deployment(&spec, &ctx).spec.unwrap().template;
        Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("demo-router-5f7c9-x2x4q".into()),
                namespace: Some("models".into()),
                uid: Some("u-router".into()),
                ..template.metadata.unwrap()
            },
            spec: template.spec,
            status: None,
        }
    }

    #[test]
    fn the_operators_router_pod_runs_the_router_binary_on_its_own_address() {
        let mut binaries = binaries();
        binaries.insert(
            "latentserve-router".to_owned(),
            PathBuf::from("/work/target/debug/latentserve-router"),
        );
        let placement = Placement {
            node_name: "test-node",
            host_ip: Ipv4Addr::LOCALHOST,
            scratch_root: Path::new("/tmp/agent"),
            binaries: &binaries,
            host_paths: &BTreeMap::new(),
        };
        let pod = router_pod();
        let spec = process_for_pod(&pod, &placement, &mut AddressBook::default()).unwrap();
        assert_eq!(
            spec.program,
            PathBuf::from("/work/target/debug/latentserve-router")
        );
        let me = spec.pod_ip;
        assert_eq!(flag(&spec.args, "--grpc-addr"), format!("{me}:50051"));
        assert_eq!(flag(&spec.args, "--openai-addr"), format!("{me}:8000"));
        assert_eq!(flag(&spec.args, "--metrics-addr"), format!("{me}:9090"));
        assert_eq!(flag(&spec.args, "--endpoints-service"), "demo-workers");
        let env: BTreeMap<&str, &str> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(env["POD_NAMESPACE"], "models");
        assert_eq!(
            readiness_check(&pod, me).unwrap(),
            Some(ReadinessCheck::Http {
                address: format!("{me}:9090"),
                path: "/readyz".to_owned()
            })
        );
        assert_eq!(
            credentials::service_account_of(&pod).as_deref(),
            Some("demo-router"),
            "the router gets its account's token"
        );
    }

    #[test]
    fn every_shard_sees_the_same_addresses_whichever_starts_first() {
        let mut book = AddressBook::default();
        let rank1 = run(&worker_pod("demo-0-1", host_path_volume()), &mut book).unwrap();
        let rank0 = run(&worker_pod("demo-0-0", host_path_volume()), &mut book).unwrap();
        assert_eq!(flag(&rank0.args, "--peers"), flag(&rank1.args, "--peers"));
        assert_eq!(
            flag(&rank0.args, "--peers"),
            format!("{}:50052,{}:50052", rank0.pod_ip, rank1.pod_ip)
        );
        assert_ne!(rank0.pod_ip, rank1.pod_ip);
    }

    #[test]
    fn sub_paths_and_nested_mounts_map_to_the_right_host_directory() {
        let mut pod = worker_pod("demo-0-0", host_path_volume());
        let container = &mut pod.spec.as_mut().unwrap().containers[0];
        container.volume_mounts.as_mut().unwrap()[0].sub_path = Some("v2-lite".to_owned());
        let spec = run(&pod, &mut AddressBook::default()).unwrap();
        assert_eq!(
            flag(&spec.args, "--model"),
            "/srv/models/latentserve-demo/v2-lite"
        );
        // A word that merely starts with the mount path's characters is not inside the mount.
        assert_eq!(
            map_mount_path("/modelx", &[("/model".to_owned(), PathBuf::from("/srv"))]),
            "/modelx"
        );
    }

    #[test]
    fn a_host_path_can_point_at_a_directory_elsewhere_on_this_machine() {
        let volume = json!({"name": "model", "hostPath": {"path": "/srv/models/elsewhere/"}});
        let spec = run(&worker_pod("demo-0-0", volume), &mut AddressBook::default()).unwrap();
        assert_eq!(flag(&spec.args, "--model"), "/work/models/demo");
    }

    #[test]
    fn a_container_without_command_runs_the_binary_its_image_is_named_after() {
        let mut pod = worker_pod("demo-0-0", host_path_volume());
        let container = &mut pod.spec.as_mut().unwrap().containers[0];
        container.command = None;
        container.image = Some("registry.example/team/latentserve-worker-cuda:0.1.0".to_owned());
        let spec = run(&pod, &mut AddressBook::default()).unwrap();
        assert_eq!(
            spec.program,
            PathBuf::from("/work/target/debug/latentserve-worker")
        );
        assert_eq!(spec.args[0], "serve");
    }

    #[test]
    fn secret_volumes_are_directories_of_the_pod_that_the_agent_fills() {
        let secret = json!({"name": "model", "secret": {"secretName": "demo-experts-token"}});
        let pod = worker_pod("demo-0-0", secret);
        let spec = run(&pod, &mut AddressBook::default()).unwrap();
        let dir = PathBuf::from("/tmp/agent/models/demo-0-0/model");
        assert_eq!(
            secret_volumes(&pod, Path::new("/tmp/agent")),
            vec![(dir.clone(), "demo-experts-token".to_owned())]
        );
        assert!(
            spec.args
                .iter()
                .any(|a| a.starts_with(dir.to_str().unwrap())),
            "the mount path maps to the volume's directory: {:?}",
            spec.args
        );
    }

    #[test]
    fn what_the_agent_cannot_run_is_named_in_the_error() {
        let pvc = json!({"name": "model", "persistentVolumeClaim": {"claimName": "weights"}});
        let err = run(&worker_pod("demo-0-0", pvc), &mut AddressBook::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pod models/demo-0-0: volume model is not supported by the test node agent (only hostPath, emptyDir, secret and configMap volumes)"
        );

        let mut pod = worker_pod("demo-0-0", host_path_volume());
        let container = &mut pod.spec.as_mut().unwrap().containers[0];
        container.env.as_mut().unwrap().push(
            serde_json::from_value(json!({
                "name": "TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
            }))
            .unwrap(),
        );
        let err = run(&pod, &mut AddressBook::default()).unwrap_err();
        assert!(err.to_string().contains("env TOKEN"), "{err}");

        let mut pod = worker_pod("demo-0-0", host_path_volume());
        pod.spec.as_mut().unwrap().containers[0].command = Some(vec!["python3".to_owned()]);
        let err = run(&pod, &mut AddressBook::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pod models/demo-0-0: no local binary for command \"python3\" (known: latentserve-worker)"
        );

        let mut pod = worker_pod("demo-0-0", host_path_volume());
        let sidecar = pod.spec.as_ref().unwrap().containers[0].clone();
        pod.spec.as_mut().unwrap().containers.push(sidecar);
        assert!(matches!(
            run(&pod, &mut AddressBook::default()),
            Err(AgentError::Unsupported { field, .. }) if field == "spec.containers"
        ));
    }

    #[test]
    fn readiness_follows_the_containers_probe_on_the_pods_address() {
        let ip = Ipv4Addr::new(127, 0, 0, 7);
        let mut pod = worker_pod("demo-0-0", host_path_volume());
        assert_eq!(
            readiness_check(&pod, ip).unwrap(),
            Some(ReadinessCheck::Http {
                address: "127.0.0.7:9090".to_owned(),
                path: "/readyz".to_owned()
            })
        );

        let container = &mut pod.spec.as_mut().unwrap().containers[0];
        container.readiness_probe =
            Some(serde_json::from_value(json!({"grpc": {"port": 50051}})).unwrap());
        assert_eq!(
            readiness_check(&pod, ip).unwrap(),
            Some(ReadinessCheck::Grpc {
                address: "127.0.0.7:50051".to_owned(),
                service: String::new()
            })
        );

        let container = &mut pod.spec.as_mut().unwrap().containers[0];
        container.readiness_probe =
            Some(serde_json::from_value(json!({"tcpSocket": {"port": "nope"}})).unwrap());
        assert_eq!(
            readiness_check(&pod, ip),
            Err(AgentError::UnknownPort {
                pod: "models/demo-0-0".to_owned(),
                port: "nope".to_owned()
            })
        );

        pod.spec.as_mut().unwrap().containers[0].readiness_probe = None;
        assert_eq!(readiness_check(&pod, ip).unwrap(), None);
    }

    #[test]
    fn the_hosts_mapping_lists_every_form_of_each_pod_name() {
        let mut book = AddressBook::default();
        let mut hosts = Hosts::new(&mut book, "models", "demo-peers");
        let name = PodDnsName::parse("demo-0-1.demo-peers", "models").unwrap();
        assert_eq!(
            hosts.hosts_file(&[name]).unwrap(),
            "127.0.0.2\tdemo-0-1.demo-peers.models.svc.cluster.local demo-0-1.demo-peers.models.svc demo-0-1.demo-peers.models demo-0-1.demo-peers\n"
        );
        assert_eq!(
            hosts.resolve("demo-0-1.demo-peers.models.svc").unwrap(),
            Some(Ipv4Addr::new(127, 0, 0, 2))
        );
        for other in [
            "example.com",
            "demo-0-1.other-peers",
            "demo-0-1.demo-peers.other-ns.svc",
        ] {
            assert_eq!(hosts.resolve(other).unwrap(), None, "{other}");
        }
        assert_eq!(
            hosts
                .rewrite_endpoints("localhost:80,demo-0-1.demo-peers:1,x")
                .unwrap(),
            "localhost:80,127.0.0.2:1,x"
        );
    }
}
