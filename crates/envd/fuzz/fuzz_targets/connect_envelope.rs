//! Arbitrary bytes as the body of Connect requests to a real envd router:
//! the envelope decoder (client streaming) and the unary JSON and binary
//! decoders. Only RPCs with no side effects outside envd are used (Stat,
//! StreamInput to processes that do not exist), so fuzzing cannot start
//! processes or touch files. The router must answer every input without
//! panicking, and never with a 5xx for a client's bytes.
#![no_main]

use std::sync::{Arc, OnceLock};

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Harness {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let router = rt.block_on(async {
            let config = envd::Config::parse_from(["envd", "--dev", "--port-forward", "off"]);
            let reaper = envd::reaper::Reaper::start().unwrap();
            let state = Arc::new(envd::state::Envd::new(config, reaper).unwrap());
            envd::http::router(state)
        });
        Harness { rt, router }
    })
}

const TARGETS: &[(&str, &str)] = &[
    ("/process.Process/StreamInput", "application/connect+json"),
    ("/process.Process/StreamInput", "application/connect+proto"),
    ("/filesystem.Filesystem/Stat", "application/json"),
    ("/filesystem.Filesystem/Stat", "application/proto"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let (path, content_type) = TARGETS[selector as usize % TARGETS.len()];
    let h = harness();
    let req = http::Request::post(path)
        .header("content-type", content_type)
        .header("connect-protocol-version", "1")
        .body(axum::body::Body::from(bytes::Bytes::copy_from_slice(body)))
        .unwrap();
    let status = h.rt.block_on(async {
        let resp = h.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        status
    });
    assert!(!status.is_server_error() || status == http::StatusCode::NOT_IMPLEMENTED, "{path}: {status}");
});
