//! The HTTP library's floor, for `bench/load.py`: hyper alone on the runtime and allocator Keygate uses
//! (tokio's work-stealing runtime, mimalloc), answering without doing anything — a GET with `ok`, a POST
//! by reading its body and answering a fixed 223-byte JSON, the size of a verify's `VALID` decision. No
//! router, middleware, timers, metrics or credential check: what is left of a Keygate request's cost
//! above this is Keygate's.
//!
//! `cargo run --release -p http-floor -- 127.0.0.1:18090`

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A `VALID` decision's size and shape.
const DECISION: &[u8] = br#"{"valid":true,"code":"VALID","kind":"api_key","key_id":"key_01a2290d2fa0DfR5uSTkYgFf","consumer_id":"cons_01a2290d2f9afnr32st9LZPM","name":"k","environment":"live","scopes":["articles:read"],"expires_at":null,"metadata":{}}"#;

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok"))));
    }
    // Read the body as a handler would (a broken one is answered all the same: nothing is checked here).
    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    std::hint::black_box(body);
    let mut resp = Response::new(Full::new(Bytes::from_static(DECISION)));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(a)) => a,
        _ => {
            eprintln!("usage: http_floor ADDRESS:PORT");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("http_floor listening on http://{addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(answer);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
