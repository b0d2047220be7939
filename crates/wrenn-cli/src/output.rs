//! Printing: aligned tables or JSON, and errors that say what to do next.

use serde::Serialize;

/// Print `rows` under `header`, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// A listing: JSON with `--json`, else a table of `row(item)` under `header`.
pub fn listing<T: Serialize>(
    json_out: bool,
    items: &[T],
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<i32> {
    if json_out {
        json(&items)?;
    } else {
        table(header, &items.iter().map(row).collect::<Vec<_>>());
    }
    Ok(0)
}

pub fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// One line for an error: what the server said, and what to do about it.
pub fn explain(e: &anyhow::Error) -> String {
    let Some(sdk) = e.downcast_ref::<wrenn_sdk::Error>() else {
        return format!("{e:#}");
    };
    let hint = match sdk {
        wrenn_sdk::Error::Connect { url, .. } => {
            return format!(
                "cannot reach wrenn at {url}: is `wrenn up` running there? \
                 (set WRENN_BASE_URL or --base-url, or run `wrenn login`)"
            )
        }
        wrenn_sdk::Error::Api { status: 401, .. } => {
            "check the key (--api-key, WRENN_API_KEY or `wrenn login`)"
        }
        wrenn_sdk::Error::Api {
            status: 409,
            message,
            ..
        } if message.contains("overwrite") => "`--overwrite` replaces it",
        wrenn_sdk::Error::Api {
            status: 404 | 409,
            message,
            ..
        } if message.contains("template ") || message.contains("reserved") => {
            "`wrenn template ls` lists the templates"
        }
        wrenn_sdk::Error::Api { status: 404, .. } => "`wrenn ls` lists your capsules",
        wrenn_sdk::Error::Api { status: 409, .. } => "`wrenn ls` shows the capsule's status",
        wrenn_sdk::Error::Api { status: 503, .. } => {
            "the server or its host is busy or starting; try again"
        }
        // (a stream's refusal is in band: its words, not a status)
        wrenn_sdk::Error::Stream(m) if m.contains("not found") => "`wrenn ls` lists your capsules",
        wrenn_sdk::Error::Stream(m) if m.contains("not running") => {
            "`wrenn ls` shows the capsule's status (`wrenn resume ID` runs it again)"
        }
        _ => "",
    };
    let msg = format!("{e:#}");
    if hint.is_empty() {
        msg
    } else {
        format!("{msg} — {hint}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_to_do() {
        let e = anyhow::Error::new(wrenn_sdk::Error::Api {
            status: 401,
            code: "unauthorized".into(),
            message: "invalid API key".into(),
        });
        let m = explain(&e);
        assert!(
            m.contains("invalid API key") && m.contains("wrenn login"),
            "{m}"
        );
        let e = anyhow::Error::new(wrenn_sdk::Error::Api {
            status: 404,
            code: "not_found".into(),
            message: "capsule not found".into(),
        })
        .context("kill cl-x");
        let m = explain(&e);
        assert!(m.contains("kill cl-x") && m.contains("wrenn ls"), "{m}");
        assert_eq!(explain(&anyhow::anyhow!("plain")), "plain");
        // the hint fits what is missing or in the way
        let api = |status, message: &str| {
            explain(&anyhow::Error::new(wrenn_sdk::Error::Api {
                status,
                code: String::new(),
                message: message.into(),
            }))
        };
        assert!(api(404, "template nothere not found").contains("wrenn template ls"));
        let taken = api(409, "template t exists (pass overwrite=true to replace it)");
        assert!(taken.contains("--overwrite"), "{taken}");
        let stream = |m: &str| explain(&anyhow::Error::new(wrenn_sdk::Error::Stream(m.into())));
        assert_eq!(
            stream("capsule not found"),
            "capsule not found — `wrenn ls` lists your capsules"
        );
        assert!(stream("capsule is not running (status: paused)").contains("wrenn resume"));
    }
}
