//! Arbitrary bytes through envd's multipart reader, split into chunks at
//! input-chosen points: it must return files or a clear error, never panic
//! or hang, and never hand out more bytes than the limit.
#![no_main]

use futures::StreamExt;
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else { return };
    let chunk = (split as usize).max(1);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = body
        .chunks(chunk)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async move {
        let mut files = envd::http::MultipartFiles::new(futures::stream::iter(chunks), "XyZ", LIMIT);
        let mut total = 0u64;
        while let Ok(Some((dest, mut part))) = files.next_file().await {
            assert!(!dest.is_empty());
            while let Some(Ok(b)) = part.next().await {
                total += b.len() as u64;
            }
        }
        assert!(total <= LIMIT, "read {total} bytes past the limit");
    });
});
