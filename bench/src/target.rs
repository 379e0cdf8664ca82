//! Target mode (`--target HOST:PORT`): the same workloads against a user's own deployment
//! instead of the chains this harness starts.
//!
//! ```text
//! sidewall-bench serve --listen 127.0.0.1:9000        # the app, behind the user's sidecar
//! sidewall-bench --target 127.0.0.1:15001 \
//!     --direct 127.0.0.1:9000 --metrics http://127.0.0.1:4691/metrics …
//! ```
//!
//! The app behind the target must be `sidewall-bench serve` ([`crate::server`]): the load
//! needs its echo and sink, and bulk throughput is what reached it, read from it through the
//! target itself (the `C` request, `GET /count` with `--http`). `--direct` is the same app
//! reached without the deployment, measured in the same run so every figure has its ratio.
//! Every `--metrics` endpoint (a sidecar's admin `/metrics`) is scraped before and after each
//! workload on `target`: the report lists what changed, and its `process_*` gauges give the
//! CPU and memory rows, since the sidecars are not this harness's children.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sidewall_bench::exposition::{self, Samples};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::http1;
use crate::load::Framing;
use crate::server::COUNT;

/// How long one scrape or count may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// What `--target` and its companions asked for.
pub(crate) struct Target {
    /// `--target`, as given.
    pub(crate) given: String,
    /// Where it resolved.
    pub(crate) entry: SocketAddr,
    /// `--direct`, as given, and where it resolved.
    pub(crate) direct: Option<(String, SocketAddr)>,
    /// Raw bytes, or HTTP/1.1 with `--http`.
    pub(crate) framing: Framing,
    /// The `--metrics` endpoints.
    pub(crate) metrics: Vec<Endpoint>,
}

/// `HOST:PORT` resolved to its first address; the error names the flag.
pub(crate) fn resolve(flag: &str, given: &str) -> Result<SocketAddr, String> {
    given
        .to_socket_addrs()
        .map_err(|e| format!("{flag} {given}: not a HOST:PORT that resolves: {e}"))?
        .next()
        .ok_or_else(|| format!("{flag} {given}: resolves to no address"))
}

/// A Prometheus endpoint over plain HTTP (a sidecar's or control plane's admin listener).
pub(crate) struct Endpoint {
    /// The URL, as given.
    pub(crate) url: String,
    addr: SocketAddr,
    authority: String,
    path: String,
}

impl Endpoint {
    /// `http://HOST:PORT/PATH` (the path defaults to `/metrics`).
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!(
                "--metrics {url}: only http:// URLs are scraped (a sidecar's admin listener \
                 speaks plain HTTP)"
            )
        })?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/metrics"),
        };
        if authority.is_empty() || !authority.contains(':') {
            return Err(format!(
                "--metrics {url}: say the port, e.g. http://127.0.0.1:4691/metrics"
            ));
        }
        Ok(Self {
            url: url.to_owned(),
            addr: resolve("--metrics", authority)?,
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }

    /// One scrape: GET, 200, the exposition text parsed.
    pub(crate) async fn scrape(&self) -> Result<Samples> {
        let attempt = async {
            let stream = tokio::net::TcpStream::connect(self.addr).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let driver = tokio::spawn(connection);
            let request = hyper::Request::get(self.path.as_str())
                .header(hyper::header::HOST, self.authority.as_str())
                .body(Empty::<bytes::Bytes>::new())?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            driver.abort();
            if !status.is_success() {
                bail!(
                    "answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                );
            }
            Ok(exposition::parse(&String::from_utf8_lossy(&body)))
        };
        tokio::time::timeout(ASK_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err(anyhow!("no answer within {ASK_TIMEOUT:?}")))
            .with_context(|| format!("scraping {}", self.url))
    }
}

/// Scrapes every endpoint, in order.
pub(crate) async fn scrape_all(endpoints: &[Endpoint]) -> Result<Vec<Samples>> {
    let mut all = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        all.push(endpoint.scrape().await?);
    }
    Ok(all)
}

/// The sum of `name` over every scrape that has it; `None` if none has.
pub(crate) fn total(scrapes: &[Samples], name: &str) -> Option<f64> {
    scrapes
        .iter()
        .filter_map(|s| exposition::total(s, name))
        .reduce(|a, b| a + b)
}

/// The bytes `sidewall-bench serve` behind `entry` has sunk so far, asked through `entry`.
pub(crate) async fn remote_count(framing: Framing, entry: SocketAddr) -> Result<u64> {
    let attempt =
        async {
            let mut stream = tokio::net::TcpStream::connect(entry).await?;
            stream.set_nodelay(true)?;
            let mut answer = Vec::new();
            match framing {
                Framing::Raw => {
                    stream.write_all(&[COUNT]).await?;
                    // Eight bytes are the answer; whatever else an app sends is not read on.
                    (&mut stream).take(64).read_to_end(&mut answer).await?;
                }
                Framing::Http => {
                    stream.write_all(&http1::count_request()).await?;
                    let head = http1::read_head(&mut stream, &mut answer)
                        .await?
                        .ok_or_else(|| anyhow!("the connection closed before the answer"))?;
                    if head.second_word() != "200" {
                        bail!("GET /count answered {:?}", head.start);
                    }
                    http1::read_body(&mut stream, &mut answer, 8).await?;
                }
            }
            let bytes: [u8; 8] = answer.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| {
            anyhow!(
                "{} bytes instead of the count: is the app behind it `sidewall-bench serve`?",
                answer.len()
            )
        })?;
            Ok(u64::from_be_bytes(bytes))
        };
    tokio::time::timeout(ASK_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(anyhow!("no answer within {ASK_TIMEOUT:?}")))
        .with_context(|| format!("asking the app behind {entry} what it received"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::server::{SINK, Server};

    #[test]
    fn endpoints_are_plain_http_with_a_port() {
        let endpoint = Endpoint::parse("http://127.0.0.1:4691").unwrap();
        assert_eq!(endpoint.path, "/metrics");
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:4691/stats/prometheus")
                .unwrap()
                .path,
            "/stats/prometheus"
        );
        for (bad, says) in [
            ("https://127.0.0.1:4691/metrics", "only http://"),
            ("127.0.0.1:4691", "only http://"),
            ("http://127.0.0.1/metrics", "say the port"),
            ("http://no.such.host.invalid:1/metrics", "resolve"),
        ] {
            let error = Endpoint::parse(bad).err().unwrap();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[tokio::test]
    async fn the_count_comes_back_in_both_framings() {
        let server = Server::start().await.unwrap();
        let mut sink = Framing::Raw.open(server.addr, SINK).await.unwrap();
        sink.write_all(&[1u8; 3000]).await.unwrap();
        sink.shutdown().await.unwrap();
        let mut rest = Vec::new();
        sink.read_to_end(&mut rest).await.unwrap();
        assert_eq!(remote_count(Framing::Raw, server.addr).await.unwrap(), 3000);
        assert_eq!(
            remote_count(Framing::Http, server.addr).await.unwrap(),
            3000
        );
        // Something else than `serve` behind the target: said, not a wrong figure.
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = echo.accept().await.unwrap();
            let _ = stream.read_u8().await;
            let _ = stream.write_all(b"nope").await;
            let _ = stream.shutdown().await;
        });
        let error = remote_count(Framing::Raw, addr).await.unwrap_err();
        assert!(
            format!("{error:#}").contains("sidewall-bench serve"),
            "{error:#}"
        );
    }
}
