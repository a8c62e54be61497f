//! Operator-wide rules that whoever installs the operator sets (the chart's values, passed as
//! flags of `latentserve-operator run`), not the authors of ModelDeployments: which host paths
//! and worker images a ModelDeployment may use, and who may reach the workers' metrics port.
//! Pure data and pure matching; `validate::check_allowed` applies them to a spec.

use std::collections::BTreeMap;

/// Allows every host path or every image when it is an entry of its list.
pub const ANY: &str = "*";

/// The host path prefix allowed when none is configured: the examples' and the tests' models
/// live under it.
pub const DEFAULT_HOST_PATH_PREFIX: &str = "/srv/models/";

/// The rules, as the operator was started with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `spec.model.hostPath.path` must be one of these directories or below one ([`ANY`]: any
    /// absolute path). Empty: hostPath models are refused.
    pub allowed_host_path_prefixes: Vec<String>,
    /// `spec.image` must match one of these ([`image_allowed`]). The operator's own default
    /// worker image (used when `spec.image` is unset) is always allowed.
    pub allowed_images: Vec<String>,
    /// Namespaces (by label) whose pods may reach the workers' metrics port; `None`: any source.
    pub metrics_namespace_selector: Option<BTreeMap<String, String>>,
    /// The operator's own namespace: admitted to the gRPC port (it asks a ready worker for the
    /// cache capacity) when a ModelDeployment restricts its client ports.
    pub operator_namespace: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allowed_host_path_prefixes: vec![DEFAULT_HOST_PATH_PREFIX.to_owned()],
            allowed_images: vec!["latentserve-worker".to_owned()],
            metrics_namespace_selector: None,
            operator_namespace: None,
        }
    }
}

/// Whether the absolute `path` is `prefix` or below it, comparing whole components: `/srv/models`
/// allows `/srv/models/demo` but not `/srv/models-old`. Paths with `.` or `..` components are
/// never allowed (the kubelet does not resolve them away); symbolic links on the node are not
/// seen here, so a prefix must be a directory that only administrators write to.
pub fn host_path_allowed(path: &str, prefixes: &[String]) -> bool {
    if !path.starts_with('/') || path.split('/').any(|part| part == "." || part == "..") {
        return false;
    }
    let components: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    prefixes.iter().any(|prefix| {
        if prefix == ANY {
            return true;
        }
        let wanted: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
        prefix.starts_with('/') && components.starts_with(&wanted)
    })
}

/// Whether `image` matches an entry of `allowed`: [`ANY`]; an entry ending in `/` (a registry
/// or a path in it, `registry.example/ml/`) matches every image under it; any other entry is a
/// repository (`registry.example/ml/latentserve-worker`) and matches it with any tag or digest.
/// Entries match the reference as written: `latentserve-worker` does not match
/// `docker.io/library/latentserve-worker`.
pub fn image_allowed(image: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|entry| {
        if entry == ANY {
            return true;
        }
        if entry.ends_with('/') {
            return image.starts_with(entry.as_str());
        }
        image_repository(image) == entry
    })
}

/// The repository of an image reference: without its `@digest` and its `:tag`.
pub fn image_repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or_default();
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}

/// `key=value,key=value` as match labels; empty: `None`.
pub fn parse_selector(text: &str) -> Result<Option<BTreeMap<String, String>>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        labels.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok((!labels.is_empty()).then_some(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn host_paths_match_whole_components_and_never_climb() {
        let prefixes = list(&["/srv/models/"]);
        assert!(host_path_allowed("/srv/models/demo", &prefixes));
        assert!(host_path_allowed("/srv/models//demo/", &prefixes));
        assert!(host_path_allowed("/srv/models", &prefixes));
        for refused in [
            "/",
            "/etc",
            "/var/lib/kubelet",
            "/srv/models-old",
            "/srv/models/../../etc",
            "/srv/models/./x",
        ] {
            assert!(!host_path_allowed(refused, &prefixes), "{refused}");
        }
        assert!(!host_path_allowed("/srv/models/demo", &[]));
        assert!(host_path_allowed("/etc", &list(&["*"])));
    }

    #[test]
    fn images_match_by_repository_or_by_registry_prefix() {
        let allowed = list(&["latentserve-worker", "registry.example/ml/"]);
        assert!(image_allowed("latentserve-worker:0.1.0", &allowed));
        assert!(image_allowed("latentserve-worker", &allowed));
        assert!(image_allowed("latentserve-worker@sha256:abc", &allowed));
        assert!(image_allowed("registry.example/ml/any:1", &allowed));
        for refused in [
            "latentserve-worker-evil:1",
            "evil.example/latentserve-worker:1",
            "registry.example/mlx/any:1",
            "busybox",
        ] {
            assert!(!image_allowed(refused, &allowed), "{refused}");
        }
        assert!(image_allowed("busybox", &list(&["*"])));
        assert_eq!(image_repository("host:5000/a/b:1"), "host:5000/a/b");
        assert_eq!(image_repository("host:5000/a/b"), "host:5000/a/b");
    }

    #[test]
    fn selectors_parse_from_key_value_pairs() {
        assert_eq!(parse_selector("").unwrap(), None);
        assert_eq!(
            parse_selector("kubernetes.io/metadata.name=monitoring, team=obs")
                .unwrap()
                .unwrap(),
            BTreeMap::from([
                ("kubernetes.io/metadata.name".into(), "monitoring".into()),
                ("team".into(), "obs".into())
            ])
        );
        assert!(parse_selector("monitoring").is_err());
    }
}
