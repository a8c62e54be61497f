//! The expert exchange's shared token: one Secret per ModelDeployment whose groups have more
//! than one shard (`NAME-experts-token`, owned, key `token`: 32 random bytes in hex), mounted
//! into every worker, which sends it to its peers and requires it of every caller.
//!
//! Unlike the other children its content is not a function of the spec, so it is not built with
//! them: this stage reads the Secret and writes it only when it is missing, unusable, or a
//! rotation is asked for.
//!
//! Rotation: deleting the Secret makes a new token at once (the workers keep the old one until
//! the kubelet updates their files, so the exchange fails for up to a minute); setting the
//! annotation [`ROTATE_ANNOTATION`] on the ModelDeployment to a new value replaces the token and
//! keeps the old one under `previous`, which every worker still accepts and sends, so a group
//! whose pods see the new files at different moments keeps working throughout.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch};
use rand::RngCore;

use super::apply::params;
use super::{Context, Error};
use crate::resources::statefulset::needs_experts_token;
use crate::resources::{Owner, names};
use crate::validate::ValidatedSpec;

/// Set on a ModelDeployment to any new value to rotate its token.
pub const ROTATE_ANNOTATION: &str = "latentserve.io/rotate-experts-token";
/// On the Secret: the value of [`ROTATE_ANNOTATION`] the current token was made for.
pub const ROTATED_FOR_ANNOTATION: &str = "latentserve.io/rotated-for";
/// The Secret's keys, the files the worker reads.
pub const TOKEN_KEY: &str = "token";
pub const PREVIOUS_KEY: &str = "previous";
/// Random bytes per token (hex in the Secret: 64 characters).
pub const TOKEN_BYTES: usize = 32;

/// A new random token.
pub fn fresh_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    let text = String::from_utf8(bytes.0.clone()).ok()?;
    // What the worker accepts: at least 32 printable ASCII characters.
    (text.len() >= 32 && text.bytes().all(|b| b.is_ascii_graphic())).then_some(text)
}

/// The Secret to write, or `None` when `existing` is current. `rotate` is the ModelDeployment's
/// [`ROTATE_ANNOTATION`]; `fresh` makes a new token.
pub fn desired_secret(
    owner: &Owner,
    existing: Option<&Secret>,
    rotate: Option<&str>,
    fresh: impl FnOnce() -> String,
) -> Option<Secret> {
    let rotate = rotate.unwrap_or_default();
    let (token, previous) = match existing.map(|secret| (secret, value(secret, TOKEN_KEY))) {
        None | Some((_, None)) => (fresh(), None),
        Some((secret, Some(current))) => {
            let rotated_for = secret
                .annotations()
                .get(ROTATED_FOR_ANNOTATION)
                .map(String::as_str)
                .unwrap_or_default();
            if rotated_for == rotate {
                return None;
            }
            (fresh(), Some(current))
        }
    };
    let name = names::experts_token(&owner.name);
    let mut meta = owner.meta(name, owner.labels("experts-token"));
    meta.annotations = Some(BTreeMap::from([(
        ROTATED_FOR_ANNOTATION.to_owned(),
        rotate.to_owned(),
    )]));
    let mut data = BTreeMap::from([(TOKEN_KEY.to_owned(), ByteString(token.into_bytes()))]);
    if let Some(previous) = previous {
        data.insert(PREVIOUS_KEY.to_owned(), ByteString(previous.into_bytes()));
    }
    Some(Secret {
        metadata: meta,
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    })
}

/// Makes sure a sharded ModelDeployment has its token Secret, before the pods that mount it.
pub async fn ensure(spec: &ValidatedSpec<'_>, ctx: &Context) -> Result<(), Error> {
    if !needs_experts_token(spec) {
        return Ok(());
    }
    let owner = spec.owner();
    let name = names::experts_token(&owner.name);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let secret_error = |source| Error::Secret {
        name: name.clone(),
        source,
    };
    let existing = api.get_opt(&name).await.map_err(secret_error)?;
    if let Some(existing) = &existing
        && !owner.controls(&existing.metadata)
    {
        return Err(Error::Conflict {
            objects: vec![format!("Secret {name}")],
        });
    }
    let rotate = spec
        .model_deployment()
        .annotations()
        .get(ROTATE_ANNOTATION)
        .map(String::as_str);
    if let Some(secret) = desired_secret(owner, existing.as_ref(), rotate, fresh_token) {
        let rotated = existing.is_some();
        api.patch(&name, &params(), &Patch::Apply(&secret))
            .await
            .map_err(secret_error)?;
        tracing::info!(secret = %name, rotated, "experts token written");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::demo;

    fn token_of(secret: &Secret, key: &str) -> Option<String> {
        value(secret, key)
    }

    #[test]
    fn a_fresh_token_is_64_hex_characters_and_new_each_time() {
        let (a, b) = (fresh_token(), fresh_token());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_missing_secret_is_created_owned_with_one_token() {
        let owner = Owner::of(&demo());
        let secret = desired_secret(&owner, None, None, || "a".repeat(64)).unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some("demo-experts-token"));
        assert!(owner.controls(&secret.metadata));
        assert_eq!(
            secret.labels()["app.kubernetes.io/instance"],
            "demo".to_owned()
        );
        assert_eq!(token_of(&secret, TOKEN_KEY), Some("a".repeat(64)));
        assert_eq!(token_of(&secret, PREVIOUS_KEY), None);
    }

    #[test]
    fn a_current_secret_is_left_alone() {
        let owner = Owner::of(&demo());
        let existing = desired_secret(&owner, None, Some("1"), || "a".repeat(64)).unwrap();
        let again = desired_secret(&owner, Some(&existing), Some("1"), || {
            panic!("no new token for a current Secret")
        });
        assert!(again.is_none());
    }

    #[test]
    fn the_annotation_rotates_and_keeps_the_old_token_as_previous() {
        let owner = Owner::of(&demo());
        let existing = desired_secret(&owner, None, None, || "a".repeat(64)).unwrap();
        let rotated = desired_secret(&owner, Some(&existing), Some("2026-12-01"), || {
            "b".repeat(64)
        })
        .unwrap();
        assert_eq!(token_of(&rotated, TOKEN_KEY), Some("b".repeat(64)));
        assert_eq!(token_of(&rotated, PREVIOUS_KEY), Some("a".repeat(64)));
        assert_eq!(
            rotated.annotations()[ROTATED_FOR_ANNOTATION],
            "2026-12-01".to_owned()
        );
        // Once is enough.
        assert!(desired_secret(&owner, Some(&rotated), Some("2026-12-01"), String::new).is_none());
    }

    #[test]
    fn an_unusable_token_is_replaced() {
        let owner = Owner::of(&demo());
        let mut broken = desired_secret(&owner, None, None, || "a".repeat(64)).unwrap();
        broken.data = Some(BTreeMap::from([(
            TOKEN_KEY.to_owned(),
            ByteString(b"short".to_vec()),
        )]));
        let fixed = desired_secret(&owner, Some(&broken), None, || "c".repeat(64)).unwrap();
        assert_eq!(token_of(&fixed, TOKEN_KEY), Some("c".repeat(64)));
        assert_eq!(token_of(&fixed, PREVIOUS_KEY), None);
    }
}
