//! The CLI's HTTP client for a running server: one place for the base URL, the admin key, path
//! segments (always percent-encoded), and turning answers into results or clear failures.

use reqwest::{Method, Url};
use serde_json::Value;

use super::{EXIT_UNREACHABLE, Failure, GlobalArgs};

pub struct Api {
    http: reqwest::Client,
    base: Url,
    admin_key: Option<String>,
    pub json: bool,
}

impl Api {
    pub fn new(args: GlobalArgs) -> Result<Self, Failure> {
        let raw = args.url.trim();
        if !(raw.starts_with("http://") || raw.starts_with("https://")) {
            return Err(Failure::usage(format!(
                "KEYGATE_URL / --url {raw:?} has no scheme; write it with one, e.g. http://{raw}"
            )));
        }
        let base = Url::parse(raw.trim_end_matches('/'))
            .map_err(|e| Failure::usage(format!("KEYGATE_URL / --url {raw:?} is not a URL: {e}")))?;
        if base.cannot_be_a_base() {
            return Err(Failure::usage(format!("KEYGATE_URL / --url {raw:?} is not a server URL")));
        }
        let admin_key = match args.admin_key.filter(|k| !k.is_empty()) {
            Some(k) => Some(super::args::secret_or_stdin(k, "admin key")?),
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| Failure::new(format!("cannot build the HTTP client: {e}")))?;
        Ok(Api { http, base, admin_key, json: args.json })
    }

    /// The URL of `segments` under the base URL, each segment percent-encoded (so an id can never
    /// climb out of its place in the path).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn admin_key(&self) -> Result<&str, Failure> {
        self.admin_key.as_deref().ok_or_else(|| {
            Failure::new(
                "no admin key: set KEYGATE_ADMIN_KEY to the key printed when Keygate first started \
                 (or pass --admin-key -, and the key on standard input)",
            )
        })
    }

    /// An admin API call. `segments` are the path's parts, e.g. `["v1", "keys", id, "revoke"]`.
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let mut req =
            self.http.request(method, self.url(segments)).bearer_auth(self.admin_key()?).query(query);
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.answer(req).await
    }

    /// An admin API call with a typed body: the same request struct the server deserialises.
    pub async fn send<T: serde::Serialize>(
        &self,
        method: Method,
        segments: &[&str],
        body: &T,
    ) -> Result<Value, Failure> {
        let body = serde_json::to_value(body)
            .map_err(|e| Failure::new(format!("cannot encode the request: {e}")))?;
        self.call(method, segments, &[], Some(body)).await
    }

    /// Sends a request and reads the answer: the JSON of a success, or a failure that says what to do.
    pub async fn answer(&self, req: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let resp = req.send().await.map_err(|e| Failure {
            code: EXIT_UNREACHABLE,
            message: format!(
                "cannot reach Keygate at {}: {}\nis `keygate serve` running? set KEYGATE_URL or --url to its address",
                self.base,
                error_chain(&e)
            ),
        })?;
        let status = resp.status();
        let text =
            resp.text().await.map_err(|e| Failure::new(format!("reading the response failed: {e}")))?;
        let value: Option<Value> = serde_json::from_str(&text).ok();
        match value {
            Some(v) if status.is_success() => Ok(v),
            None if status.is_success() && text.is_empty() => Ok(Value::Null),
            Some(v) if v.get("code").is_some() || v.get("error").is_some() => {
                let code = v.get("code").or_else(|| v.get("error")).and_then(Value::as_str).unwrap_or("?");
                let message = v
                    .get("message")
                    .or_else(|| v.get("error_description"))
                    .and_then(Value::as_str)
                    .unwrap_or("no message");
                Err(Failure::new(format!("{message} (code {code}, HTTP {})", status.as_u16())))
            }
            _ => Err(Failure::new(format!(
                "the server at {} answered HTTP {} with something that is not Keygate's; is KEYGATE_URL \
                 pointing at Keygate (and not at a proxy or another service)?",
                self.base,
                status.as_u16()
            ))),
        }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

/// An error with its causes, e.g. "error sending request: connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
