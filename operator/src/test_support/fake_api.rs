//! An in-process fake of the Kubernetes API server, behind a real `kube::Client`: enough of
//! list (with equality label selectors), get, server-side apply (whole objects, and the status
//! subresource), create and delete to run the reconciler in milliseconds. It records every
//! request, and fails the ones a test asks it to fail.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Without the query.
    pub path: String,
    /// Percent-decoded.
    pub query: String,
    pub content_type: Option<String>,
    pub body: Value,
}

impl Recorded {
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

struct Failure {
    method: String,
    path_contains: String,
    code: u16,
}

#[derive(Default)]
struct State {
    /// Objects by collection path (`/apis/apps/v1/namespaces/models/statefulsets`) and name.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    requests: Vec<Recorded>,
    failures: Vec<Failure>,
    resource_version: u64,
}

/// The fake API server; clones share the same state.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// A client whose every request this fake answers.
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let fake = fake.clone();
            async move { Ok::<_, Infallible>(fake.handle(request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Stores `object` in `collection` as if it had been created earlier.
    pub fn insert(&self, collection: &str, mut object: Value) {
        let mut state = self.lock();
        state.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
        let name = object["metadata"]["name"]
            .as_str()
            .expect("stored objects have names")
            .to_owned();
        state
            .objects
            .entry(collection.to_owned())
            .or_default()
            .insert(name, object);
    }

    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(collection)?.get(name).cloned()
    }

    /// Answers requests of `method` whose path contains `path_contains` with an API error.
    pub fn fail(&self, method: &str, path_contains: &str, code: u16) {
        self.lock().failures.push(Failure {
            method: method.to_owned(),
            path_contains: path_contains.to_owned(),
            code,
        });
    }

    /// The requests received so far, and forgets them.
    pub fn take_requests(&self) -> Vec<Recorded> {
        std::mem::take(&mut self.lock().requests)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("the fake's lock is never poisoned")
    }

    async fn handle(&self, request: Request<Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect_bytes()
            .await
            .expect("request bodies are in memory");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("the client sends JSON")
        };
        let recorded = Recorded {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: percent_decode(parts.uri.query().unwrap_or_default()),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body,
        };
        let mut state = self.lock();
        state.requests.push(recorded.clone());
        if let Some(failure) = state.failures.iter().find(|f| {
            f.method == recorded.method && recorded.path.contains(f.path_contains.as_str())
        }) {
            return status(failure.code, "injected by the test");
        }
        state.answer(&recorded)
    }
}

impl State {
    fn answer(&mut self, request: &Recorded) -> Response<Body> {
        let Some((collection, name, subresource)) = split_path(&request.path) else {
            return status(404, "not a namespaced resource path");
        };
        match (request.method.as_str(), name) {
            ("GET", None) => {
                let selector = request
                    .query
                    .split('&')
                    .find_map(|p| p.strip_prefix("labelSelector="))
                    .unwrap_or_default();
                let items: Vec<Value> = self
                    .objects
                    .get(&collection)
                    .into_iter()
                    .flat_map(|objects| objects.values())
                    .filter(|object| matches_selector(object, selector))
                    .cloned()
                    .collect();
                let list = json!({
                    "apiVersion": "v1",
                    "kind": "List",
                    "metadata": {"resourceVersion": self.resource_version.to_string()},
                    "items": items,
                });
                ok(200, &list)
            }
            ("GET", Some(name)) => match self.objects.get(&collection).and_then(|o| o.get(name)) {
                Some(object) => ok(200, object),
                None => status(404, "not found"),
            },
            ("POST", None) => {
                let mut object = request.body.clone();
                let name = object["metadata"]["name"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("generated-{}", self.resource_version + 1));
                object["metadata"]["name"] = json!(name);
                self.store(&collection, &name, object.clone());
                ok(201, &self.objects[&collection][&name])
            }
            ("PATCH", Some(name)) if subresource == Some("status") => {
                let Some(mut object) = self
                    .objects
                    .get(&collection)
                    .and_then(|o| o.get(name))
                    .cloned()
                else {
                    return status(404, "not found");
                };
                object["status"] = request.body["status"].clone();
                self.store(&collection, name, object);
                ok(200, &self.objects[&collection][name])
            }
            ("PATCH", Some(name)) => {
                // Server-side apply of a whole object: the applied fields replace the stored
                // ones; what the API server owns (status, uid) stays.
                let previous = self.objects.get(&collection).and_then(|o| o.get(name));
                let mut object = request.body.clone();
                if let Some(previous) = previous {
                    if object.get("status").is_none() && previous.get("status").is_some() {
                        object["status"] = previous["status"].clone();
                    }
                    object["metadata"]["uid"] = previous["metadata"]["uid"].clone();
                } else {
                    object["metadata"]["uid"] = json!(format!("uid-{name}"));
                }
                self.store(&collection, name, object);
                ok(200, &self.objects[&collection][name])
            }
            ("DELETE", Some(name)) => {
                match self
                    .objects
                    .get_mut(&collection)
                    .and_then(|o| o.remove(name))
                {
                    Some(object) => ok(200, &object),
                    None => status(404, "not found"),
                }
            }
            _ => status(405, "not served by the fake"),
        }
    }

    fn store(&mut self, collection: &str, name: &str, mut object: Value) {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.objects
            .entry(collection.to_owned())
            .or_default()
            .insert(name.to_owned(), object);
    }
}

/// `(collection, name, subresource)` of `/api[s]/.../namespaces/NS/PLURAL[/NAME[/SUB]]`.
fn split_path(path: &str) -> Option<(String, Option<&str>, Option<&str>)> {
    let at = path.find("/namespaces/")?;
    let rest = &path[at + "/namespaces/".len()..];
    let mut parts = rest.split('/');
    let namespace = parts.next()?;
    let plural = parts.next()?;
    let name = parts.next();
    let subresource = parts.next();
    Some((
        format!("{}/namespaces/{namespace}/{plural}", &path[..at]),
        name,
        subresource,
    ))
}

/// Equality selectors only (`a=b,c=d`), which is all the operator uses.
fn matches_selector(object: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|term| !term.is_empty())
        .all(|term| {
            let (key, value) = term.split_once('=').unwrap_or((term, ""));
            object["metadata"]["labels"][key].as_str() == Some(value)
        })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ok(code: u16, body: &Value) -> Response<Body> {
    respond(code, body)
}

/// A `Status` error the way the API server sends one.
fn status(code: u16, message: &str) -> Response<Body> {
    let reason = match code {
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        _ => "InternalError",
    };
    respond(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }),
    )
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::to_vec(body).expect("JSON values serialize"),
        ))
        .expect("a valid response")
}
