//! `GET /files` (download) and `POST /files` (upload), E2B's semantics
//! (`e2b-compat.md` §4.2–4.3).
//!
//! Uploads stream to disk through a blocking writer thread fed by a bounded
//! channel; the total size is capped by `--max-upload-bytes`. A new file is
//! created in place (so watchers see CREATE, CHMOD, WRITE on its own name);
//! an existing file is replaced by writing a temporary sibling and renaming
//! it over, so a failed upload never destroys what was there. Whatever
//! fails midway (disk full, body cut, size cap) removes the partial file.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use subtle::ConstantTimeEq;
use tower::ServiceExt;
use wrenn_types::envd::{file_signature, FileOp, WrittenEntry};

use super::{error_response, DRAIN_TIME};
use crate::auth;
use crate::fs::{chown_to, make_parents, write_metadata, FsError};
use crate::paths;
use crate::state::Envd;
use crate::users::User;

/// Read size for downloads: large reads keep the blocking-pool hops few.
const DOWNLOAD_CHUNK: usize = 1 << 20;

/// Query parameters of `/files`.
#[derive(Debug, Default)]
struct FileQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<i64>,
}

fn parse_query(raw: Option<&str>) -> Result<FileQuery, FileError> {
    let raw = raw.unwrap_or("");
    // (form_urlencoded decodes lossily: `%FF` and `%FE` would both name a
    // file called U+FFFD, a path other than the one asked for)
    for pair in raw.split('&') {
        let plus_spaced = pair.replace('+', " ");
        if percent_encoding::percent_decode_str(&plus_spaced)
            .decode_utf8()
            .is_err()
        {
            return Err(FileError::BadRequest(
                "the query is not UTF-8 once decoded".into(),
            ));
        }
    }
    let mut q = FileQuery::default();
    for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
        match &*k {
            "path" => q.path = Some(v.into_owned()),
            "username" => q.username = Some(v.into_owned()),
            "signature" => q.signature = Some(v.into_owned()),
            "signature_expiration" => {
                q.signature_expiration =
                    Some(v.parse().map_err(|_| {
                        FileError::BadRequest("invalid signature_expiration".into())
                    })?)
            }
            _ => {}
        }
    }
    Ok(q)
}

/// A token header wins; otherwise a URL signature is required (only once a
/// token is set).
fn check_auth(
    state: &Envd,
    headers: &HeaderMap,
    q: &FileQuery,
    op: FileOp,
) -> Result<(), FileError> {
    let Some(token) = state.token() else {
        return Ok(());
    };
    let unauthorized = |m: &str| FileError::Unauthorized(m.to_string());
    if let Some(presented) = auth::presented_token(headers) {
        return if state.token_ok(Some(presented)) {
            Ok(())
        } else {
            Err(unauthorized(auth::UNAUTHORIZED))
        };
    }
    let Some(signature) = &q.signature else {
        return Err(unauthorized("missing signature query parameter"));
    };
    if let Some(exp) = q.signature_expiration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if exp < now {
            return Err(unauthorized("signature is already expired"));
        }
    }
    let want = file_signature(
        q.path.as_deref().unwrap_or(""),
        op,
        q.username.as_deref().unwrap_or(""),
        &token,
        q.signature_expiration,
    );
    if bool::from(want.as_bytes().ct_eq(signature.as_bytes())) {
        Ok(())
    } else {
        Err(unauthorized("invalid signature"))
    }
}

/// Parse the query, check auth for `op`, and resolve the acting user.
fn authorize(
    state: &Envd,
    headers: &HeaderMap,
    raw_query: Option<&str>,
    op: FileOp,
) -> Result<(FileQuery, User), FileError> {
    let q = parse_query(raw_query)?;
    check_auth(state, headers, &q, op)?;
    let accounts = state
        .accounts()
        .map_err(|e| FileError::Internal(e.to_string()))?;
    let user = state
        .user(&accounts, q.username.as_deref())
        .map_err(|e| FileError::Unauthorized(e.to_string()))?;
    Ok((q, user))
}

/// `GET /files`.
pub async fn download(State(state): State<Arc<Envd>>, req: Request) -> Response {
    download_inner(&state, req)
        .await
        .unwrap_or_else(FileError::into_response)
}

async fn download_inner(state: &Envd, req: Request) -> Result<Response, FileError> {
    let (q, user) = authorize(state, req.headers(), req.uri().query(), FileOp::Read)?;
    let path = paths::resolve(q.path.as_deref().unwrap_or(""), &user.home);
    let size = match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_dir() => return Err(FsError::IsDir(path).into()),
        // (opening a FIFO waits for a writer, and the reader left behind
        // when the client gives up takes what the next writer sends)
        Ok(m) if m.file_type().is_fifo() || m.file_type().is_socket() => {
            return Err(FileError::BadRequest(format!(
                "{} is a FIFO or a socket, not a file to download",
                path.display()
            )))
        }
        Ok(m) => m.len(),
        Err(e) => {
            return Err(match FsError::from_io("stat", &path, e) {
                FsError::NotDir(_) => FileError::Missing(path),
                FsError::NotFound(_) => FileError::Missing(path),
                other => other.into(),
            })
        }
    };
    let encoding = negotiate(req.headers()).ok_or(FileError::NotAcceptable)?;
    // A file whose size says 0 may still have contents (`/proc` and other
    // generated files): sent as read, without a length, unless a range or
    // a HEAD needs the file server's handling (a truly empty file reads as
    // nothing either way).
    let as_read = size == 0 && req.method() == http::Method::GET && is_plain(req.headers());
    let mut resp = match encoding {
        Encoding::Gzip => {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| FsError::from_io("open", &path, e))?;
            let reader = tokio::io::BufReader::with_capacity(DOWNLOAD_CHUNK, file);
            let gz = async_compression::tokio::bufread::GzipEncoder::new(reader);
            let mut r =
                Body::from_stream(tokio_util::io::ReaderStream::with_capacity(gz, 64 * 1024))
                    .into_response();
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            r
        }
        Encoding::Identity if as_read => {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| FsError::from_io("open", &path, e))?;
            Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                file,
                DOWNLOAD_CHUNK,
            ))
            .into_response()
        }
        Encoding::Identity => tower_http::services::ServeFile::new(&path)
            .with_buf_chunk_size(DOWNLOAD_CHUNK)
            .oneshot(req)
            .await
            .map_err(|e| FileError::Internal(e.to_string()))?
            .map(Body::new),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace(['"', '\\', '\r', '\n'], "_"))
        .unwrap_or_default();
    let h = resp.headers_mut();
    if !h.contains_key(header::CONTENT_TYPE) {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    if let Ok(v) = HeaderValue::from_str(&format!("inline; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    Ok(resp)
}

#[derive(Debug, PartialEq, Eq)]
enum Encoding {
    Gzip,
    Identity,
}

/// Pick gzip when the client takes it and asked for no range or condition;
/// identity when that is acceptable; `None` (406) otherwise.
fn negotiate(headers: &HeaderMap) -> Option<Encoding> {
    let Some(accept) = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
    else {
        return Some(Encoding::Identity);
    };
    let mut gzip = false;
    let mut identity: Option<bool> = None;
    let mut star: Option<bool> = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .filter_map(|v| v.trim().parse::<f32>().ok())
            .next()
            .unwrap_or(1.0);
        match coding.as_str() {
            "gzip" | "x-gzip" => gzip = q > 0.0,
            "identity" => identity = Some(q > 0.0),
            "*" => star = Some(q > 0.0),
            _ => {}
        }
    }
    if (gzip || star == Some(true)) && is_plain(headers) {
        return Some(Encoding::Gzip);
    }
    if identity.or(star).unwrap_or(true) {
        return Some(Encoding::Identity);
    }
    None
}

/// Whether a download asks for no range and sets no condition.
fn is_plain(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::RANGE)
        && !headers.contains_key(header::IF_MODIFIED_SINCE)
        && !headers.contains_key(header::IF_NONE_MATCH)
        && !headers.contains_key(header::IF_RANGE)
}

/// Why a transfer failed; each maps to one status, here and only here.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("path '{}' does not exist", .0.display())]
    Missing(PathBuf),
    #[error("unsupported Accept-Encoding: only gzip and identity are available")]
    NotAcceptable,
    #[error("upload exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("failed to read request body: {0}")]
    Body(String),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{0}")]
    Internal(String),
}

impl FileError {
    fn into_response(self) -> Response {
        let status = match &self {
            FileError::BadRequest(_) | FileError::Body(_) => StatusCode::BAD_REQUEST,
            FileError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            FileError::Missing(_) => StatusCode::NOT_FOUND,
            FileError::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            FileError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            FileError::Fs(FsError::NoSpace(_)) => StatusCode::INSUFFICIENT_STORAGE,
            FileError::Fs(FsError::NotFound(_)) => StatusCode::NOT_FOUND,
            FileError::Fs(FsError::IsDir(_))
            | FileError::Fs(FsError::NotDir(_))
            | FileError::Fs(FsError::ExistsNotDir(_))
            | FileError::Fs(FsError::InvalidPath { .. })
            | FileError::Fs(FsError::Metadata { .. }) => StatusCode::BAD_REQUEST,
            FileError::Fs(FsError::PermissionDenied(_)) => StatusCode::FORBIDDEN,
            FileError::Fs(_) | FileError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(err = ?self, "file transfer failed");
        }
        error_response(status, self.to_string())
    }
}

/// A boxed stream of body bytes.
pub type ByteStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// `POST /files`.
pub async fn upload(
    State(state): State<Arc<Envd>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (stream, reader) = drained_body(body);
    let result = match authorize(&state, &headers, raw.as_deref(), FileOp::Write) {
        Ok((q, user)) => upload_inner(&state, &q, &headers, &user, stream).await,
        Err(e) => {
            drop(stream); // the reader now discards the body
            Err(e)
        }
    };
    // Answer only once the client has sent its body (or DRAIN_LIMIT more of
    // it, or DRAIN_TIME passed): an answer sent while it is still writing is
    // lost to most clients as a broken pipe.
    if tokio::time::timeout(DRAIN_TIME, reader).await.is_err() {
        tracing::debug!("upload body not drained in time");
    }
    match result {
        Ok(entries) if entries.is_empty() => {
            FileError::BadRequest("no file part named 'file' in the upload".into()).into_response()
        }
        Ok(entries) => Json(entries).into_response(),
        Err(e) => e.into_response(),
    }
}

/// After a failed upload, at most this much more of the body is read and
/// discarded before answering (for at most [`DRAIN_TIME`]).
const DRAIN_LIMIT: u64 = 256 << 20;

/// Read `body` on a task that forwards it through a bounded channel while
/// the returned stream is alive, then discards up to [`DRAIN_LIMIT`] more.
/// The handle ends when the body is over (it aborts the task when dropped).
fn drained_body(body: Body) -> (ByteStream, DrainHandle) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let task = tokio::spawn(async move {
        let mut body = body.into_data_stream();
        let mut discarded = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()));
            let failed = chunk.is_err();
            if tx.is_closed() {
                discarded += chunk.map_or(0, |c| c.len() as u64);
                if discarded > DRAIN_LIMIT {
                    return;
                }
            } else if tx.send(chunk).await.is_err() {
                continue;
            }
            if failed {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (Box::pin(stream), DrainHandle(task))
}

/// The body reader of [`drained_body`].
struct DrainHandle(tokio::task::JoinHandle<()>);

impl std::future::Future for DrainHandle {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

impl Drop for DrainHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn upload_inner(
    state: &Envd,
    q: &FileQuery,
    headers: &HeaderMap,
    user: &User,
    body: ByteStream,
) -> Result<Vec<WrittenEntry>, FileError> {
    let metadata: BTreeMap<String, String> = headers
        .iter()
        .filter_map(|(k, v)| {
            let key = k.as_str().strip_prefix("x-metadata-")?;
            Some((key.to_string(), v.to_str().ok()?.to_string()))
        })
        .collect();
    crate::fs::check_metadata(&metadata).map_err(FileError::BadRequest)?;
    let mut stream = body;
    let gzipped = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if gzipped {
        let reader = tokio_util::io::StreamReader::new(stream);
        let gz = async_compression::tokio::bufread::GzipDecoder::new(reader);
        stream = Box::pin(tokio_util::io::ReaderStream::with_capacity(gz, 64 * 1024));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut budget = state.config.max_upload_bytes;
    let mut written = Vec::new();
    if content_type.to_ascii_lowercase().starts_with("multipart/") {
        let boundary = multer::parse_boundary(content_type)
            .map_err(|e| FileError::BadRequest(format!("invalid multipart content type: {e}")))?;
        let mut files = MultipartFiles::new(stream, &boundary, budget);
        let mut seen = HashSet::new();
        while let Some((raw_dest, body)) = files.next_file().await? {
            let path = upload_path(q.path.as_deref().unwrap_or(&raw_dest), user)?;
            if !seen.insert(path.clone()) {
                return Err(FileError::BadRequest(format!(
                    "two files in the upload target '{}'",
                    path.display()
                )));
            }
            write_stream(&path, user, body, &mut budget).await?;
            written.push(finish(&path, &metadata)?);
        }
    } else {
        let raw_dest = q.path.as_deref().ok_or_else(|| {
            FileError::BadRequest("the path query parameter is required for raw uploads".into())
        })?;
        let path = upload_path(raw_dest, user)?;
        write_stream(&path, user, stream, &mut budget).await?;
        written.push(finish(&path, &metadata)?);
    }
    Ok(written)
}

/// Where an upload goes. A path that ends in `/` names a directory: the
/// file would otherwise land at the path without the slash.
fn upload_path(raw: &str, user: &User) -> Result<PathBuf, FileError> {
    let path = paths::resolve(raw, &user.home);
    if raw.ends_with('/') {
        return Err(FsError::IsDir(path).into());
    }
    Ok(path)
}

fn finish(path: &Path, metadata: &BTreeMap<String, String>) -> Result<WrittenEntry, FileError> {
    if !metadata.is_empty() || !crate::fs::read_metadata(path).is_empty() {
        write_metadata(path, metadata)?;
    }
    Ok(WrittenEntry {
        path: path.to_string_lossy().into_owned(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: "file".into(),
        metadata: (!metadata.is_empty()).then(|| metadata.clone()),
    })
}

/// The `file` parts of a multipart body, in order. A part's destination is
/// its filename taken verbatim; parts with other names are skipped. At most
/// `limit` bytes are read in all.
pub struct MultipartFiles {
    mp: multer::Multipart<'static>,
    limit: u64,
    /// Bytes handed out as file contents; see [`MULTIPART_OVERHEAD`].
    yielded: Arc<AtomicU64>,
}

/// Most bytes of a multipart body that may be anything but file contents
/// (preamble, part headers, skipped parts, boundaries). The parser buffers
/// such bytes while it looks for a boundary, so they must be bounded apart
/// from the upload size.
pub const MULTIPART_OVERHEAD: u64 = 4 << 20;

impl MultipartFiles {
    pub fn new<S>(stream: S, boundary: &str, limit: u64) -> Self
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let constraints = multer::Constraints::new().size_limit(
            multer::SizeLimit::new()
                .whole_stream(limit.saturating_add(MULTIPART_OVERHEAD))
                .per_field(limit),
        );
        let yielded = Arc::new(AtomicU64::new(0));
        let seen = yielded.clone();
        let mut read = 0u64;
        let counted = stream.map(move |chunk| {
            if let Ok(b) = &chunk {
                read += b.len() as u64;
                if read.saturating_sub(seen.load(Ordering::Relaxed)) > MULTIPART_OVERHEAD {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("more than {MULTIPART_OVERHEAD} bytes of multipart framing"),
                    ));
                }
            }
            chunk
        });
        Self {
            mp: multer::Multipart::with_constraints(
                OneChunkPerPoll {
                    inner: Box::pin(counted),
                    yielded_last: false,
                },
                boundary,
                constraints,
            ),
            limit,
            yielded,
        }
    }

    /// The next file part: its destination and its contents, which must be
    /// read to the end before asking for the next part.
    pub async fn next_file(&mut self) -> Result<Option<(String, ByteStream)>, FileError> {
        loop {
            let field = match self.mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(None),
                Err(e) => return Err(multipart_error(e, self.limit)),
            };
            if field.name() != Some("file") {
                continue;
            }
            let dest = field.file_name().unwrap_or("").to_string();
            if dest.is_empty() {
                return Err(FileError::BadRequest(
                    "a file part has no filename and no path was given".into(),
                ));
            }
            let limit = self.limit;
            let yielded = self.yielded.clone();
            let counted = field.inspect(move |chunk| {
                if let Ok(b) = chunk {
                    yielded.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
            });
            let body: ByteStream =
                Box::pin(counted.map_err(move |e| match multipart_error(e, limit) {
                    FileError::TooLarge(_) => std::io::Error::new(
                        std::io::ErrorKind::FileTooLarge,
                        format!("upload exceeds the limit of {limit} bytes"),
                    ),
                    other => {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string())
                    }
                }));
            return Ok(Some((dest, body)));
        }
    }
}

/// Hands out one chunk per poll. multer's parser reads its stream for as
/// long as chunks are ready before it parses, so behind a fast sender and a
/// slow disk it would buffer without bound (and trip the framing limit
/// above); with this it parses, and yields file data, between chunks.
struct OneChunkPerPoll<S> {
    inner: std::pin::Pin<Box<S>>,
    yielded_last: bool,
}

impl<S: Stream> Stream for OneChunkPerPoll<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        if std::mem::take(&mut self.yielded_last) {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let next = self.inner.as_mut().poll_next(cx);
        self.yielded_last = matches!(next, std::task::Poll::Ready(Some(_)));
        next
    }
}

fn multipart_error(e: multer::Error, limit: u64) -> FileError {
    match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            FileError::TooLarge(limit)
        }
        multer::Error::StreamReadFailed(e) => match e.downcast_ref::<std::io::Error>() {
            Some(io) if io.kind() == std::io::ErrorKind::InvalidData => {
                FileError::BadRequest(format!("malformed multipart body: {io}"))
            }
            _ => FileError::Body(e.to_string()),
        },
        other => FileError::BadRequest(format!("malformed multipart body: {other}")),
    }
}

/// Stream `body` into `path` as `user`, charging `budget`.
async fn write_stream<S>(
    path: &Path,
    user: &User,
    mut body: S,
    budget: &mut u64,
) -> Result<(), FileError>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    // Writing to a symlink writes its target (as E2B's envd does), so the
    // link survives the upload.
    let target = write_target(path)?;
    let path = target.as_path();
    // (opening a FIFO waits for a reader; a socket cannot be opened)
    if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo() || m.file_type().is_socket()) {
        return Err(FileError::BadRequest(format!(
            "{} is a FIFO or a socket, not a file to write",
            path.display()
        )));
    }
    let (to, owner) = (target.clone(), user.clone());
    let writer = tokio::task::spawn_blocking(move || write_file(&to, &owner, rx));
    let mut failure = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => {
                let len = chunk.len() as u64;
                if len > *budget {
                    failure = Some(FileError::TooLarge(*budget));
                    break;
                }
                *budget -= len;
                if tx.send(chunk).await.is_err() {
                    break; // the writer failed; its error is below
                }
            }
            Err(e) => {
                failure = Some(body_error(e, *budget));
                break;
            }
        }
    }
    let done = failure.is_none();
    drop(tx);
    let result = writer
        .await
        .map_err(|e| FileError::Fs(FsError::from_io("write", path, std::io::Error::other(e))))?;
    match (result, failure) {
        (Err(e), _) => Err(e.into()),
        // a device, written in place: nothing to remove or commit
        (Ok(None), Some(f)) => Err(f),
        (Ok(None), None) if done => Ok(()),
        (Ok(None), None) => Err(FileError::Body("upload ended early".into())),
        (Ok(Some(staged)), Some(f)) => {
            let _ = std::fs::remove_file(&staged);
            Err(f)
        }
        (Ok(Some(staged)), None) if done => {
            if staged != path {
                commit_replacement(&staged, path, user)?;
            }
            Ok(())
        }
        (Ok(Some(staged)), None) => {
            let _ = std::fs::remove_file(&staged);
            Err(FileError::Body("upload ended early".into()))
        }
    }
}

fn body_error(e: std::io::Error, limit: u64) -> FileError {
    let text = e.to_string();
    if e.kind() == std::io::ErrorKind::FileTooLarge {
        FileError::TooLarge(limit)
    } else if e.kind() == std::io::ErrorKind::InvalidData
        || e.kind() == std::io::ErrorKind::UnexpectedEof
    {
        FileError::BadRequest(format!("invalid request body: {text}"))
    } else {
        FileError::Body(text)
    }
}

/// Where writing to `path` lands, as an `open` with `O_CREAT` would: a
/// symlink's target, through chains of links, a dangling one's included
/// (the file is created there). More than 40 links is `ELOOP`, as in the
/// kernel.
fn write_target(path: &Path) -> Result<PathBuf, FsError> {
    let mut p = path.to_path_buf();
    for _ in 0..=40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&p).map_err(|e| FsError::from_io("readlink", &p, e))?;
                p = match p.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => return Ok(std::fs::canonicalize(&p).unwrap_or(p)),
        }
    }
    let e = std::io::Error::from_raw_os_error(libc::ELOOP);
    Err(FsError::from_io("open", path, e))
}

/// Write chunks from `rx` into a new file at `path`, or into a temporary
/// sibling when `path` exists. Returns the file written (removed on
/// error), or `None` for a device, written in place (`/dev/null`: a
/// staged file renamed over it would replace the node).
fn write_file(
    path: &Path,
    user: &User,
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> Result<Option<PathBuf>, FsError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err(FsError::IsDir(path.to_path_buf())),
        Ok(m) if m.file_type().is_char_device() || m.file_type().is_block_device() => {
            let mut dev = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| FsError::from_io("open", path, e))?;
            while let Some(chunk) = rx.blocking_recv() {
                dev.write_all(&chunk)
                    .map_err(|e| FsError::from_io("write", path, e))?;
            }
            return Ok(None);
        }
        _ => {}
    }
    make_parents(path, user)?;
    let open_new = |p: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(p)
    };
    // A new file is written in place; when the path exists (or appears
    // meanwhile: a concurrent upload), a staged sibling replaces it.
    let fresh = match std::fs::symlink_metadata(path) {
        Err(_) => open_new(path).ok(),
        Ok(_) => None,
    };
    let (staged, mut file) = match fresh {
        Some(f) => (path.to_path_buf(), f),
        None => {
            let staged = staging_path(path);
            let f = open_new(&staged).map_err(|e| FsError::from_io("create", path, e))?;
            (staged, f)
        }
    };
    let result = (|| {
        // A umask wider than 022 may have narrowed the mode; new files are
        // 0644. Only chmod when needed: each chmod is one more event for
        // watchers, who expect exactly CREATE, CHMOD (the chown), WRITE.
        let mode = file
            .metadata()
            .map_err(|e| FsError::from_io("stat", path, e))?
            .permissions()
            .mode();
        if mode & 0o777 != 0o644 {
            file.set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(|e| FsError::from_io("chmod", path, e))?;
        }
        chown_to(&staged, user)?;
        while let Some(chunk) = rx.blocking_recv() {
            file.write_all(&chunk)
                .map_err(|e| FsError::from_io("write", path, e))?;
        }
        file.flush().map_err(|e| FsError::from_io("write", path, e))
    })();
    if let Err(e) = result {
        drop(file);
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(Some(staged))
}

fn staging_path(path: &Path) -> PathBuf {
    let mut raw = [0u8; 6];
    let _ = getrandom::fill(&mut raw);
    let suffix: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Within a name's 255 bytes once the dot and the suffix are added (a
    // long name's replacement would fail with ENAMETOOLONG).
    let mut keep = name
        .len()
        .min(255 - ".".len() - ".wrenn-upload-".len() - suffix.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    name.truncate(keep);
    path.with_file_name(format!(".{name}.wrenn-upload-{suffix}"))
}

/// Move a staged replacement over `path`, keeping the old file's mode.
fn commit_replacement(staged: &Path, path: &Path, user: &User) -> Result<(), FsError> {
    let result = (|| {
        if let Ok(old) = std::fs::metadata(path) {
            std::fs::set_permissions(staged, old.permissions())
                .map_err(|e| FsError::from_io("chmod", staged, e))?;
        }
        chown_to(staged, user)?;
        match std::fs::rename(staged, path) {
            // `path` is a mount point (a bind-mounted file: the runtime's
            // /etc/hosts, /etc/resolv.conf): written over in place, as
            // E2B's envd writes every file.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                overwrite_in_place(staged, path)?;
                let _ = std::fs::remove_file(staged);
                Ok(())
            }
            r => r.map_err(|e| FsError::from_io("rename", path, e)),
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(staged);
    }
    result
}

/// Copy `staged` over the contents of `path` (truncated first).
fn overwrite_in_place(staged: &Path, path: &Path) -> Result<(), FsError> {
    let mut from = std::fs::File::open(staged).map_err(|e| FsError::from_io("open", staged, e))?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| FsError::from_io("open", path, e))?;
    std::io::copy(&mut from, &mut to).map_err(|e| FsError::from_io("write", path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
        h
    }

    /// 32 MiB of file part arriving as fast as it can (every chunk ready at
    /// once) is parsed as it comes, not buffered whole: no framing error.
    #[tokio::test]
    async fn a_fast_sender_does_not_trip_the_framing_limit() {
        let boundary = "b0undary";
        let data = vec![7u8; 32 << 20];
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/x\"\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(&data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let chunks: Vec<Result<Bytes, std::io::Error>> = body
            .chunks(64 << 10)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut files = MultipartFiles::new(futures::stream::iter(chunks), boundary, 64 << 20);
        let (dest, mut part) = files.next_file().await.unwrap().unwrap();
        assert_eq!(dest, "/tmp/x");
        let mut n = 0;
        while let Some(chunk) = part.next().await {
            n += chunk.unwrap().len();
        }
        assert_eq!(n, data.len());
        drop(part);
        assert!(files.next_file().await.unwrap().is_none());
    }

    #[test]
    fn negotiates_like_envd() {
        assert_eq!(negotiate(&HeaderMap::new()), Some(Encoding::Identity));
        assert_eq!(negotiate(&accept("gzip, deflate")), Some(Encoding::Gzip));
        assert_eq!(negotiate(&accept("identity")), Some(Encoding::Identity));
        assert_eq!(negotiate(&accept("br")), Some(Encoding::Identity));
        assert_eq!(negotiate(&accept("br, identity;q=0")), None);
        assert_eq!(negotiate(&accept("gzip;q=0, *;q=0")), None);
        let mut ranged = accept("gzip");
        ranged.insert(header::RANGE, "bytes=0-1".parse().unwrap());
        assert_eq!(negotiate(&ranged), Some(Encoding::Identity));
    }
}
