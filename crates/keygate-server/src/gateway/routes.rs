//! The gateway's routes file: what it accepts, how it is checked, and how a request finds its route.
//!
//! ```toml
//! credential_header = "X-Api-Token"   # optional, read beside `Authorization: Bearer` and `X-API-Key`
//! connect_timeout_ms = 5000
//!
//! [internal_jwt]                      # optional: a short-lived JWT for upstreams to verify offline
//! audience = "https://articles.internal"
//!
//! [[route]]
//! name = "articles"
//! host = "api.example.com"            # optional; with a port if the clients use one
//! path = "/v1/articles/{id}"          # a prefix of whole segments; {name} is any one segment
//! methods = ["GET", "POST"]           # optional: every method
//! upstream = "http://127.0.0.1:9000"  # or a list, taken in turn
//! scopes = ["articles:read"]
//! method_scopes = { POST = ["articles:write"] }
//! ```
//!
//! Matching: routes are ranked most specific first (a host beats none, then more segments, then more
//! literal segments, then a method list), ties in file order; the first that matches host, path and
//! method wins. Paths are compared after percent-decoding each segment, and a path whose decoded
//! segments could mean something else upstream (`.`, `..`, an empty segment, an encoded `/` or `\`) is
//! refused before any matching, so no spelling of a protected path can reach a route meant for another.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::uri::{Authority, Scheme};
use axum::http::{HeaderName, Method};
use keygate_core::scope;
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    /// A header that carries the credential, read after `Authorization` and `X-API-Key`.
    #[serde(default)]
    pub credential_header: Option<String>,
    /// How long to wait for a connection to an upstream, in milliseconds.
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default)]
    pub internal_jwt: Option<InternalJwtSpec>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteSpec>,
}

fn default_connect_ms() -> u64 {
    5000
}

/// `[internal_jwt]`: routes with `internal_jwt = true` send the upstream a JWT signed by Keygate's
/// current signing key (in the JWKS), with `typ: keygate-gateway+jwt`, so it cannot pass as an access
/// token anywhere.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalJwtSpec {
    /// The `aud` claim: the name the upstreams check for.
    pub audience: String,
    /// Lifetime in seconds (10 to 3600).
    #[serde(default = "default_jwt_lifetime")]
    pub lifetime_seconds: u64,
    /// The header that carries it.
    #[serde(default = "default_jwt_header")]
    pub header: String,
}

fn default_jwt_lifetime() -> u64 {
    60
}

fn default_jwt_header() -> String {
    "X-Keygate-Token".into()
}

/// One or several strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Credential kinds a route accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accept {
    ApiKey,
    AccessToken,
}

/// `[[route]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Letters, digits, `.`, `_`, `-`; at most 64. Names the route in errors, logs and metrics.
    pub name: String,
    #[serde(default)]
    pub host: Option<String>,
    pub path: String,
    /// Match the path exactly instead of as a prefix.
    #[serde(default)]
    pub exact: bool,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    pub upstream: OneOrMany,
    /// Remove the route's path from the front of the path sent upstream.
    #[serde(default)]
    pub strip_path: bool,
    /// No credential needed (and none checked).
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub accept: Option<Vec<Accept>>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub method_scopes: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub cost: Option<u64>,
    /// How long to wait for the upstream's response headers, in seconds (1 to 3600).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Send the client's `Host` upstream instead of the upstream's own.
    #[serde(default)]
    pub preserve_host: bool,
    #[serde(default)]
    pub internal_jwt: bool,
}

fn default_timeout() -> u64 {
    30
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

/// Where a route sends requests.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The base URL's path without a trailing `/` (empty for the root).
    pub base_path: String,
    /// `Host` for requests to it (the authority, as the HTTP client would write it), made once.
    pub host_header: axum::http::HeaderValue,
}

/// A checked route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// `gateway:<name>`, the route's label in metrics and the access log.
    pub label: String,
    host: Option<String>,
    segments: Vec<Segment>,
    exact: bool,
    methods: Option<Vec<Method>>,
    upstreams: Vec<Upstream>,
    next: AtomicUsize,
    pub strip_path: bool,
    pub public: bool,
    pub accept_keys: bool,
    pub accept_tokens: bool,
    pub scopes: Vec<String>,
    method_scopes: Vec<(Method, Vec<String>)>,
    pub audience: Option<String>,
    pub cost: u64,
    pub timeout: Duration,
    pub preserve_host: bool,
    pub internal_jwt: bool,
}

impl Route {
    /// The next upstream, in turn.
    pub fn upstream(&self) -> &Upstream {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.upstreams[i % self.upstreams.len()]
    }

    /// Scopes a request with this method needs: the route's and the method's (HEAD needs GET's: it
    /// runs the same handler upstream).
    pub fn required_scopes(&self, method: &Method) -> Vec<&str> {
        let mut out: Vec<&str> = self.scopes.iter().map(String::as_str).collect();
        for (m, s) in &self.method_scopes {
            if m == method || (*m == Method::GET && method == Method::HEAD) {
                out.extend(s.iter().map(String::as_str));
            }
        }
        out
    }

    /// The route as `keygate routes check` shows it, in matching order.
    pub fn describe(&self) -> serde_json::Value {
        let path: String = if self.segments.is_empty() {
            "/".into()
        } else {
            self.segments
                .iter()
                .map(|s| match s {
                    Segment::Literal(l) => format!("/{l}"),
                    Segment::Param => "/{}".into(),
                })
                .collect()
        };
        let accept: Vec<&str> = [(self.accept_keys, "api_key"), (self.accept_tokens, "access_token")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        serde_json::json!({
            "name": self.name,
            "host": self.host,
            "path": path,
            "exact": self.exact,
            "methods": self.methods.as_ref().map(|ms| ms.iter().map(Method::as_str).collect::<Vec<_>>()),
            "upstreams": self.upstreams.iter().map(|u| format!("{}://{}{}", u.scheme, u.authority, u.base_path)).collect::<Vec<_>>(),
            "public": self.public,
            "accept": if self.public { Vec::new() } else { accept },
            "scopes": self.scopes,
            "method_scopes": self.method_scopes.iter().map(|(m, s)| (m.as_str().to_string(), s.clone())).collect::<BTreeMap<_, _>>(),
            "audience": self.audience,
            "cost": self.cost,
            "timeout_seconds": self.timeout.as_secs(),
            "strip_path": self.strip_path,
            "internal_jwt": self.internal_jwt,
        })
    }

    /// The methods for `Allow` (every method when the route lists none).
    pub fn allow(&self) -> String {
        match &self.methods {
            None => String::new(),
            Some(ms) => {
                let mut names: Vec<&str> = ms.iter().map(Method::as_str).collect();
                if ms.contains(&Method::GET) && !ms.contains(&Method::HEAD) {
                    names.push("HEAD");
                }
                names.join(", ")
            }
        }
    }

    /// How many leading segments of the request path the route's path covers.
    pub fn depth(&self) -> usize {
        self.segments.len()
    }

    fn matches_path(&self, segments: &[Cow<'_, str>]) -> bool {
        if segments.len() < self.segments.len() || (self.exact && segments.len() != self.segments.len()) {
            return false;
        }
        self.segments.iter().zip(segments).all(|(want, got)| match want {
            Segment::Literal(l) => l == got.as_ref(),
            Segment::Param => true,
        })
    }

    fn matches_method(&self, method: &Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|ms| ms.iter().any(|m| m == method || (*m == Method::GET && method == Method::HEAD)))
    }

    fn matches_host(&self, host: Option<&str>) -> bool {
        let Some(want) = &self.host else { return true };
        let Some(got) = host else { return false };
        if want.contains(':') {
            want.eq_ignore_ascii_case(got)
        } else {
            let bare = got.rsplit_once(':').filter(|(h, _)| !h.ends_with(']') || h.starts_with('[')).map_or(
                got,
                |(h, p)| {
                    if p.bytes().all(|b| b.is_ascii_digit()) { h } else { got }
                },
            );
            want.eq_ignore_ascii_case(bare)
        }
    }
}

/// The checked routes file.
#[derive(Debug)]
pub struct Routes {
    /// Most specific first.
    pub routes: Vec<Route>,
    pub credential_header: Option<HeaderName>,
    pub connect_timeout: Duration,
    pub internal_jwt: Option<InternalJwtSpec>,
    pub internal_jwt_header: Option<HeaderName>,
}

/// What a request path is, for matching.
#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// A segment that could mean something else upstream.
    Ambiguous,
}

/// The request path's segments, percent-decoded; a trailing `/` adds none.
pub fn segments(path: &str) -> Result<Vec<Cow<'_, str>>, PathError> {
    let Some(rest) = path.strip_prefix('/') else { return Err(PathError::Ambiguous) };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let mut out = Vec::new();
    for raw in rest.split('/') {
        let decoded =
            percent_encoding::percent_decode_str(raw).decode_utf8().map_err(|_| PathError::Ambiguous)?;
        if decoded.is_empty()
            || decoded == "."
            || decoded == ".."
            || decoded.contains(['/', '\\', '\0', ';'])
            || raw.contains('\\')
        {
            return Err(PathError::Ambiguous);
        }
        out.push(decoded);
    }
    Ok(out)
}

/// The outcome of looking a request up.
pub enum Lookup<'a> {
    Found(&'a Route),
    /// No route with the most specific matching host and path takes this method (the value is for
    /// `Allow`). The lookup ends there: a request never falls through to a broader route, which may be
    /// public, by changing its method.
    MethodNotAllowed(String),
    NotFound,
}

impl Routes {
    pub fn lookup(&self, host: Option<&str>, segments: &[Cow<'_, str>], method: &Method) -> Lookup<'_> {
        // `api.example.com.` is the same host to DNS and to most servers.
        let host = host.map(|h| match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(']') => {
                std::borrow::Cow::Owned(format!("{}:{port}", name.trim_end_matches('.')))
            }
            _ => std::borrow::Cow::Borrowed(h.trim_end_matches('.')),
        });
        let Some(first) =
            self.routes.iter().find(|r| r.matches_host(host.as_deref()) && r.matches_path(segments))
        else {
            return Lookup::NotFound;
        };
        // Routes with the same host and path may split the methods between them.
        let same =
            |r: &&Route| r.host == first.host && r.segments == first.segments && r.exact == first.exact;
        if let Some(r) = self.routes.iter().filter(same).find(|r| r.matches_method(method)) {
            return Lookup::Found(r);
        }
        let allow: Vec<String> = self.routes.iter().filter(same).map(Route::allow).collect();
        Lookup::MethodNotAllowed(allow.join(", "))
    }

    /// What is legal but risky: a public route whose path covers a protected route's. Matching is exact
    /// and case-sensitive, but an upstream that is not (IIS, a case-insensitive file system) would serve
    /// `/ADMIN` or `/Admin` — which match only the public route — as the protected `/admin`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for public in self.routes.iter().filter(|r| r.public && !r.exact) {
            for protected in self.routes.iter().filter(|r| !r.public) {
                let same_host = public.host.is_none() || public.host == protected.host;
                let covers = public.segments.len() < protected.segments.len()
                    && public.segments.iter().zip(&protected.segments).all(|(p, q)| match (p, q) {
                        (Segment::Param, _) => true,
                        (Segment::Literal(a), Segment::Literal(b)) => a == b,
                        (Segment::Literal(_), Segment::Param) => false,
                    });
                if same_host && covers {
                    out.push(format!(
                        "public route {:?} covers the paths of protected route {:?}: another spelling of them \
                         (a different letter case) reaches the upstream through the public route; make sure \
                         the upstream treats paths case-sensitively, or narrow the public route",
                        public.name, protected.name
                    ));
                }
            }
        }
        out
    }

    /// Reads and checks a routes file; the error says which route and what to change.
    pub fn load(path: &std::path::Path) -> Result<Routes, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the routes file {}: {e}", path.display()))?;
        Routes::parse(&text).map_err(|e| format!("the routes file {} is not valid: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Routes, String> {
        let file: RoutesFile = toml::from_str(text).map_err(|e| e.to_string())?;
        compile(file)
    }
}

const HOP_OR_OWN: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
];

fn header_name(what: &str, v: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(v.trim().as_bytes())
        .map_err(|_| format!("{what} {v:?} is not a header name"))?;
    if HOP_OR_OWN.contains(&name.as_str())
        || name.as_str().starts_with("x-keygate-") && what == "credential_header"
    {
        return Err(format!("{what} {v:?} cannot be used: the gateway manages that header itself"));
    }
    Ok(name)
}

fn compile(file: RoutesFile) -> Result<Routes, String> {
    let credential_header =
        file.credential_header.as_deref().map(|h| header_name("credential_header", h)).transpose()?;
    if !(100..=60_000).contains(&file.connect_timeout_ms) {
        return Err("connect_timeout_ms must be 100 to 60000".into());
    }
    let internal_jwt_header = match &file.internal_jwt {
        Some(j) => {
            if !(10..=3600).contains(&j.lifetime_seconds) {
                return Err("internal_jwt.lifetime_seconds must be 10 to 3600".into());
            }
            if j.audience.trim().is_empty() || j.audience.len() > 2048 {
                return Err("internal_jwt.audience must name the upstreams (1 to 2048 characters)".into());
            }
            Some(header_name("internal_jwt.header", &j.header)?)
        }
        None => None,
    };
    let mut routes = Vec::with_capacity(file.routes.len());
    let mut names = std::collections::HashSet::new();
    for (i, spec) in file.routes.into_iter().enumerate() {
        let label = format!("route {} ({:?})", i + 1, spec.name);
        if !names.insert(spec.name.clone()) {
            return Err(format!("{label}: another route has this name"));
        }
        let route = compile_route(spec, file.internal_jwt.is_some()).map_err(|e| format!("{label}: {e}"))?;
        routes.push(route);
    }
    if routes.is_empty() {
        return Err("there is no [[route]]: the gateway would answer 404 to everything".into());
    }
    // Most specific first; `sort_by_key` is stable, so ties keep file order.
    routes.sort_by_key(|r| {
        let literals = r.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        std::cmp::Reverse((r.host.is_some(), r.segments.len(), literals, r.methods.is_some()))
    });
    Ok(Routes {
        routes,
        credential_header,
        connect_timeout: Duration::from_millis(file.connect_timeout_ms),
        internal_jwt: file.internal_jwt,
        internal_jwt_header,
    })
}

fn method(m: &str) -> Result<Method, String> {
    let m = m.trim();
    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("method {m:?} must be an upper-case HTTP method, e.g. GET"));
    }
    Method::from_bytes(m.as_bytes()).map_err(|_| format!("method {m:?} is not an HTTP method"))
}

fn scopes(what: &str, list: &[String]) -> Result<(), String> {
    if list.len() > scope::MAX_SCOPES {
        return Err(format!("{what}: at most {} scopes", scope::MAX_SCOPES));
    }
    list.iter().try_for_each(|s| scope::validate_scope(s).map_err(|e| format!("{what}: {e}")))
}

fn upstream(url: &str) -> Result<Upstream, String> {
    let parsed = url::Url::parse(url.trim()).map_err(|e| format!("upstream {url:?} is not a URL: {e}"))?;
    let scheme = match parsed.scheme() {
        "http" => Scheme::HTTP,
        "https" => Scheme::HTTPS,
        other => return Err(format!("upstream {url:?}: the scheme must be http or https, not {other}")),
    };
    if parsed.query().is_some()
        || parsed.fragment().is_some()
        || !parsed.username().is_empty()
        || parsed.password().is_some()
    {
        return Err(format!("upstream {url:?}: give only scheme, host, port and path"));
    }
    let host = parsed.host_str().ok_or_else(|| format!("upstream {url:?} has no host"))?;
    let authority = match parsed.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let authority = authority.parse::<Authority>().map_err(|_| format!("upstream {url:?}: bad host"))?;
    let base_path = parsed.path().trim_end_matches('/').to_string();
    let host_header = axum::http::HeaderValue::from_str(authority.as_str())
        .map_err(|_| format!("upstream {url:?}: bad host"))?;
    Ok(Upstream { scheme, authority, base_path, host_header })
}

fn compile_route(spec: RouteSpec, have_jwt: bool) -> Result<Route, String> {
    if spec.name.is_empty()
        || spec.name.len() > 64
        || !spec.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err("the name must be 1 to 64 letters, digits, '.', '_' or '-'".into());
    }
    if !spec.path.starts_with('/') {
        return Err(format!("path {:?} must start with '/'", spec.path));
    }
    let decoded = segments(&spec.path).map_err(|_| {
        format!("path {:?} has an empty, '.' or '..' segment, or an encoded '/' or '\\'", spec.path)
    })?;
    let mut segs = Vec::with_capacity(decoded.len());
    for s in decoded {
        if s.starts_with('{') && s.ends_with('}') && s.len() > 2 {
            segs.push(Segment::Param);
        } else if s.contains(['{', '}', '*', '?']) {
            return Err(format!("path {:?}: a parameter is a whole segment, e.g. /users/{{id}}", spec.path));
        } else {
            segs.push(Segment::Literal(s.into_owned()));
        }
    }
    let host = match spec.host {
        Some(h) => {
            let h = h.trim().to_ascii_lowercase();
            if h.is_empty()
                || h.parse::<Authority>().map(|a| a.as_str() != h).unwrap_or(true)
                || h.contains('@')
            {
                return Err(format!("host {h:?} is not a host name (with an optional :port)"));
            }
            Some(h)
        }
        None => None,
    };
    let methods = match &spec.methods {
        Some(ms) if ms.is_empty() => {
            return Err("methods is empty: leave it out to accept every method".into());
        }
        Some(ms) => Some(ms.iter().map(|m| method(m)).collect::<Result<Vec<_>, _>>()?),
        None => None,
    };
    let urls = match spec.upstream {
        OneOrMany::One(u) => vec![u],
        OneOrMany::Many(us) => us,
    };
    if urls.is_empty() {
        return Err("upstream is empty: give a base URL, e.g. \"http://127.0.0.1:9000\"".into());
    }
    let upstreams = urls.iter().map(|u| upstream(u)).collect::<Result<Vec<_>, _>>()?;
    scopes("scopes", &spec.scopes)?;
    let mut method_scopes = Vec::new();
    for (m, list) in &spec.method_scopes {
        let m = method(m)?;
        if let Some(ms) = &methods
            && !ms.contains(&m)
        {
            return Err(format!("method_scopes names {m}, which is not in methods"));
        }
        scopes(&format!("method_scopes.{m}"), list)?;
        method_scopes.push((m, list.clone()));
    }
    let (accept_keys, accept_tokens) = match &spec.accept {
        None => (true, true),
        Some(a) if a.is_empty() => return Err("accept is empty: list api_key, access_token or both".into()),
        Some(a) => (a.contains(&Accept::ApiKey), a.contains(&Accept::AccessToken)),
    };
    if spec.public
        && (!spec.scopes.is_empty()
            || !method_scopes.is_empty()
            || spec.accept.is_some()
            || spec.audience.is_some()
            || spec.internal_jwt
            || spec.cost.is_some())
    {
        return Err("a public route checks no credential: remove scopes, method_scopes, accept, audience, cost and internal_jwt, or public".into());
    }
    if spec.audience.as_ref().is_some_and(|a| a.trim().is_empty() || a.len() > 2048) {
        return Err("audience must be 1 to 2048 characters".into());
    }
    let cost = spec.cost.unwrap_or(1);
    if cost > crate::routes::verify::MAX_COST {
        return Err(format!("cost must be at most {}", crate::routes::verify::MAX_COST));
    }
    if !(1..=3600).contains(&spec.timeout_seconds) {
        return Err("timeout_seconds must be 1 to 3600".into());
    }
    if spec.internal_jwt && !have_jwt {
        return Err("internal_jwt = true needs an [internal_jwt] section with the audience".into());
    }
    Ok(Route {
        label: format!("gateway:{}", spec.name),
        name: spec.name,
        host,
        segments: segs,
        exact: spec.exact,
        methods,
        upstreams,
        next: AtomicUsize::new(0),
        strip_path: spec.strip_path,
        public: spec.public,
        accept_keys,
        accept_tokens,
        scopes: spec.scopes,
        method_scopes,
        audience: spec.audience,
        cost,
        timeout: Duration::from_secs(spec.timeout_seconds),
        preserve_host: spec.preserve_host,
        internal_jwt: spec.internal_jwt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(text: &str) -> Routes {
        match Routes::parse(text) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn find<'a>(r: &'a Routes, host: Option<&str>, path: &str, method: Method) -> Option<&'a str> {
        let segs = segments(path).ok()?;
        match r.lookup(host, &segs, &method) {
            Lookup::Found(route) => Some(route.name.as_str()),
            _ => None,
        }
    }

    const FILE: &str = r#"
        [[route]]
        name = "all"
        path = "/"
        upstream = "http://127.0.0.1:1"
        public = true
        [[route]]
        name = "articles"
        path = "/v1/articles"
        methods = ["GET", "POST"]
        upstream = ["http://127.0.0.1:2/base/", "http://127.0.0.1:3"]
        scopes = ["articles:read"]
        method_scopes = { POST = ["articles:write"] }
        [[route]]
        name = "one-article"
        path = "/v1/articles/{id}/comments"
        upstream = "http://127.0.0.1:4"
        [[route]]
        name = "hosted"
        host = "api.example.com"
        path = "/v1/articles"
        upstream = "http://127.0.0.1:5"
    "#;

    #[test]
    fn the_most_specific_route_wins() {
        let r = routes(FILE);
        assert_eq!(find(&r, None, "/v1/articles", Method::GET), Some("articles"));
        assert_eq!(find(&r, None, "/v1/articles/", Method::GET), Some("articles"));
        assert_eq!(find(&r, None, "/v1/articles/7", Method::HEAD), Some("articles"));
        assert_eq!(find(&r, None, "/v1/articles/7/comments/2", Method::DELETE), Some("one-article"));
        assert_eq!(find(&r, Some("API.example.com:8443"), "/v1/articles", Method::GET), Some("hosted"));
        assert_eq!(find(&r, Some("other.example"), "/v1/articles", Method::GET), Some("articles"));
        // A prefix counts whole segments only; the public catch-all takes the rest.
        assert_eq!(find(&r, None, "/v1/articlesX", Method::GET), Some("all"));
        // A method the most specific route does not take ends the lookup: no falling through to "all".
        let segs = segments("/v1/articles").unwrap_or_default();
        assert!(matches!(r.lookup(None, &segs, &Method::DELETE), Lookup::MethodNotAllowed(_)));
        assert_eq!(find(&r, Some("api.example.com.:80"), "/v1/articles", Method::GET), Some("hosted"));
        assert_eq!(find(&r, Some("api.example.com."), "/v1/articles", Method::GET), Some("hosted"));
        let route = r.routes.iter().find(|x| x.name == "articles").map(|x| x.required_scopes(&Method::POST));
        assert_eq!(route, Some(vec!["articles:read", "articles:write"]));
        let get = r
            .routes
            .iter()
            .find(|x| x.name == "articles")
            .map(|x| (x.required_scopes(&Method::GET) == x.required_scopes(&Method::HEAD), x.allow()));
        assert_eq!(get, Some((true, "GET, POST, HEAD".to_string())));
    }

    #[test]
    fn encoded_spellings_of_a_protected_path_match_it() {
        let r = routes(FILE);
        assert_eq!(find(&r, None, "/v1/%61rticles", Method::GET), Some("articles"));
        for bad in [
            "/public/../v1/articles",
            "/v1//articles",
            "/v1/%2e%2e/x",
            "/v1%2farticles",
            "/v1/a%5cb",
            "/v1/%ff",
            "x",
        ] {
            assert_eq!(segments(bad), Err(PathError::Ambiguous), "{bad}");
        }
    }

    #[test]
    fn mistakes_name_the_route_and_the_fix() {
        let bad = |text: &str, want: &str| match Routes::parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => assert!(e.contains(want), "{e} (wanted {want})"),
        };
        let one = |extra: &str| {
            format!("[[route]]\nname = \"r\"\npath = \"/a\"\nupstream = \"http://127.0.0.1:1\"\n{extra}")
        };
        bad(&one("public = true\nscopes = [\"a\"]"), "route 1 (\"r\"): a public route checks no credential");
        bad(&one("methods = [\"get\"]"), "upper-case");
        bad(&one("methods = [\"GET\"]\nmethod_scopes = { POST = [\"w\"] }"), "not in methods");
        bad(&one("internal_jwt = true"), "[internal_jwt]");
        bad(&one("timeout_seconds = 0"), "timeout_seconds");
        bad(&one("scopes = [\"bad scope\"]"), "scopes");
        bad(&one("nonsense = 1"), "unknown field");
        bad("[[route]]\nname = \"r\"\npath = \"/a/../b\"\nupstream = \"http://x\"", "'..'");
        bad("[[route]]\nname = \"r\"\npath = \"/a\"\nupstream = \"ftp://x\"", "http or https");
        bad("[[route]]\nname = \"r\"\npath = \"/a\"\nupstream = \"http://u:p@x\"", "only scheme");
        bad("[[route]]\nname = \"r r\"\npath = \"/a\"\nupstream = \"http://x\"", "the name");
        bad("credential_header = \"Connection\"", "manages that header");
        bad(&format!("{}\n{}", one(""), one("")), "another route has this name");
        bad("connect_timeout_ms = 1000", "there is no [[route]]");
    }

    #[test]
    fn a_public_route_over_a_protected_one_is_warned_about() {
        let r = routes(FILE);
        let w = r.warnings();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w.iter().all(|m| m.starts_with("public route \"all\" covers")), "{w:?}");
    }

    #[test]
    fn upstreams_are_taken_in_turn() {
        let r = routes(FILE);
        let Some(route) = r.routes.iter().find(|x| x.name == "articles") else { panic!("no route") };
        let first = route.upstream().authority.to_string();
        let second = route.upstream().authority.to_string();
        assert_eq!((first.as_str(), second.as_str()), ("127.0.0.1:2", "127.0.0.1:3"));
        assert_eq!(route.upstreams[0].base_path, "/base");
    }
}
