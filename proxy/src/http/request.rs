//! The checks a request must pass before any policy sees it. Each failure is a `400` (or
//! `405`) with a short body that names no internals; the log says why.

use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, UPGRADE};
use hyper::{Method, Request, StatusCode, Version};
use sidewall_policies::http::{PathParameters, normalize_path, strip_path_parameters, valid_host};

/// Hop-by-hop headers, never forwarded to the app (RFC 9110 §7.6.1).
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A refused request.
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) body: &'static str,
    pub(crate) reason: &'static str,
}

fn bad(reason: &'static str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        body: "bad request\n",
        reason,
    }
}

/// What the checks established.
pub(crate) struct Checked {
    /// The normalized path.
    pub(crate) path: String,
    /// The query, unchanged.
    pub(crate) query: Option<String>,
    /// The host (Host header or `:authority`), if any.
    pub(crate) host: Option<String>,
    /// A WebSocket upgrade request.
    pub(crate) websocket: bool,
}

/// Checks a request; see the module doc.
pub(crate) fn check(
    request: &Request<Incoming>,
    parameters: PathParameters,
) -> Result<Checked, Refusal> {
    let headers = request.headers();
    let hosts: Vec<_> = headers.get_all(HOST).iter().collect();
    if hosts.len() > 1 {
        return Err(bad("two Host headers"));
    }
    let header_host = match hosts.first() {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| bad("Host is not visible ASCII"))?
                .to_owned(),
        ),
        None => None,
    };
    let authority = request.uri().authority().map(|a| a.as_str().to_owned());
    let host = match (header_host, authority) {
        (Some(h), Some(a)) if !h.eq_ignore_ascii_case(&a) => {
            return Err(bad("Host and :authority disagree"));
        }
        (Some(h), _) => Some(h),
        (None, Some(a)) => Some(a),
        (None, None) if request.version() == Version::HTTP_11 => {
            return Err(bad("HTTP/1.1 request without Host"));
        }
        (None, None) => None,
    };
    if let Some(host) = &host
        && !valid_host(host)
    {
        return Err(bad("malformed Host"));
    }
    if headers.contains_key(TRANSFER_ENCODING) && headers.contains_key(CONTENT_LENGTH) {
        return Err(bad("Content-Length with Transfer-Encoding"));
    }
    let lengths: Vec<_> = headers.get_all(CONTENT_LENGTH).iter().collect();
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return Err(bad("differing Content-Length headers"));
    }
    for (_, value) in headers {
        if value
            .as_bytes()
            .iter()
            .any(|&b| b == 0 || b == b'\r' || b == b'\n')
        {
            return Err(bad("control character in a header value"));
        }
    }
    let mut websocket = false;
    if let Some(upgrade) = headers.get(UPGRADE) {
        let upgrade = upgrade.to_str().unwrap_or_default();
        let asks_upgrade = headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or_default()
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
        if upgrade.eq_ignore_ascii_case("websocket")
            && asks_upgrade
            && request.method() == Method::GET
        {
            websocket = true;
        } else {
            return Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                body: "upgrade not allowed\n",
                reason: "protocol upgrade other than WebSocket (h2c included)",
            });
        }
    }
    if request.method() == Method::CONNECT {
        // CONNECT has no path to normalize; it is decided as "/" and refused unless a rule
        // names the method CONNECT.
        return Ok(Checked {
            path: "/".into(),
            query: None,
            host,
            websocket: false,
        });
    }
    let raw_path = request.uri().path();
    if request.uri().scheme().is_some() && request.version() == Version::HTTP_11 {
        // Absolute-form (a proxy request) is not how clients talk to a service.
        return Err(bad("absolute-form request target"));
    }
    let raw_path = match parameters {
        PathParameters::Refuse => std::borrow::Cow::Borrowed(raw_path),
        PathParameters::Strip => {
            strip_path_parameters(raw_path).map_err(|_| bad("dot segment with path parameters"))?
        }
    };
    let path = normalize_path(&raw_path)
        .map_err(|_| bad("path refused by normalization"))?
        .into_owned();
    Ok(Checked {
        path,
        query: request.uri().query().map(str::to_owned),
        host,
        websocket,
    })
}
