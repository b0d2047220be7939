//! Recipes: wrenn's template build steps, one per line.
//!
//! `RUN [--timeout=D] cmd`, `START cmd`, `ENV K=V` (expands `$VAR`,
//! `${VAR}` and `$$` against what was set before), `WORKDIR path`,
//! `USER name`, `COPY src… dst` (relative sources from the build context,
//! no `..`); keywords are case-insensitive; blank lines and lines starting
//! with `#` are skipped. The healthcheck is a separate line:
//! `[--interval=3s] [--timeout=10s] [--start-period=0s] [--retries=0] cmd`.
//! Untrusted text reaches this parser (the build API, recipe files), so it
//! is fuzzed (`crates/wrenn-types/fuzz`, target `recipe`) and never panics.

use std::collections::BTreeMap;
use std::time::Duration;

pub const MAX_RECIPE_BYTES: usize = 256 << 10;
pub const MAX_STEPS: usize = 500;
/// The most text ENV values and WORKDIR paths may expand to, all together
/// (`ENV A=$A$A$A…` doubles on every line).
pub const MAX_EXPANDED_BYTES: usize = 1 << 20;
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Run { cmd: String, timeout: Duration },
    Start { cmd: String },
    Env { key: String, value: String },
    Workdir { path: String },
    User { name: String },
    Copy { sources: Vec<String>, dest: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    pub cmd: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
    /// 0 = until `timeout` runs out.
    pub retries: u32,
}

/// What is wrong with a recipe, at `line` (1-based; 0: the whole recipe,
/// shown without a line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{msg}", if *line == 0 { String::new() } else { format!("line {line}: ") })]
pub struct RecipeError {
    pub line: usize,
    pub msg: String,
}

fn err(line: usize, msg: impl Into<String>) -> RecipeError {
    RecipeError {
        line,
        msg: msg.into(),
    }
}

fn duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s)
        .ok()
        .filter(|d| *d <= Duration::from_secs(24 * 3600))
}

/// Expand `$VAR`, `${VAR}` and `$$` against `vars` (unknown = empty);
/// `None` once the result passes `limit` bytes.
pub fn expand(s: &str, vars: &BTreeMap<String, String>, limit: usize) -> Option<String> {
    let mut out = String::with_capacity(s.len().min(limit));
    let mut it = s.char_indices().peekable();
    while let Some((_, c)) = it.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match it.peek().map(|(_, c)| *c) {
            Some('$') => {
                it.next();
                out.push('$');
            }
            Some('{') => {
                it.next();
                let mut name = String::new();
                let mut closed = false;
                for (_, c) in it.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if closed {
                    out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
                } else {
                    out.push_str("${");
                    out.push_str(&name);
                }
            }
            Some(c) if c == '_' || c.is_ascii_alphabetic() => {
                let mut name = String::new();
                while let Some((_, c)) = it.peek() {
                    if *c == '_' || c.is_ascii_alphanumeric() {
                        name.push(*c);
                        it.next();
                    } else {
                        break;
                    }
                }
                out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
            }
            _ => out.push('$'),
        }
        if out.len() > limit {
            return None;
        }
    }
    (out.len() <= limit).then_some(out)
}

fn is_env_key(k: &str) -> bool {
    let mut b = k.bytes();
    b.next()
        .is_some_and(|c| c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

fn is_user(u: &str) -> bool {
    let mut b = u.bytes();
    (1..=32).contains(&u.len())
        && b.next()
            .is_some_and(|c| c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c == b'-' || c.is_ascii_alphanumeric())
}

fn safe_source(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('/') && !s.split('/').any(|p| p == "..")
}

/// Parse a recipe. ENV values are expanded here, in order.
pub fn parse(text: &str) -> Result<Vec<Step>, RecipeError> {
    if text.len() > MAX_RECIPE_BYTES {
        return Err(err(
            0,
            format!("recipe is larger than {MAX_RECIPE_BYTES} bytes"),
        ));
    }
    let mut steps = Vec::new();
    let mut vars = BTreeMap::new();
    let mut expand_left = MAX_EXPANDED_BYTES;
    let too_long = || format!("variables expand to more than {MAX_EXPANDED_BYTES} bytes");
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if l.contains('\0') {
            return Err(err(line, "NUL byte"));
        }
        let (kw, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
        let rest = rest.trim();
        let step = match kw.to_ascii_uppercase().as_str() {
            "RUN" => {
                let (timeout, cmd) = match rest.strip_prefix("--timeout=") {
                    Some(t) => {
                        let (d, cmd) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
                        let d =
                            duration(d).ok_or_else(|| err(line, format!("bad timeout {d:?}")))?;
                        (d, cmd.trim())
                    }
                    None => (DEFAULT_RUN_TIMEOUT, rest),
                };
                if cmd.is_empty() {
                    return Err(err(line, "RUN needs a command"));
                }
                Step::Run {
                    cmd: cmd.to_owned(),
                    timeout,
                }
            }
            "START" if !rest.is_empty() => Step::Start {
                cmd: rest.to_owned(),
            },
            "ENV" => {
                let (k, v) = rest
                    .split_once('=')
                    .ok_or_else(|| err(line, "ENV needs KEY=VALUE"))?;
                if !is_env_key(k) {
                    return Err(err(line, format!("bad variable name {k:?}")));
                }
                let value = expand(v, &vars, expand_left).ok_or_else(|| err(line, too_long()))?;
                expand_left -= value.len();
                vars.insert(k.to_owned(), value.clone());
                Step::Env {
                    key: k.to_owned(),
                    value,
                }
            }
            "WORKDIR" if !rest.is_empty() => {
                let path = expand(rest, &vars, expand_left).ok_or_else(|| err(line, too_long()))?;
                expand_left -= path.len();
                Step::Workdir { path }
            }
            "USER" if is_user(rest) => Step::User {
                name: rest.to_owned(),
            },
            "USER" => return Err(err(line, format!("bad user name {rest:?}"))),
            "COPY" => {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                if parts.len() < 2 {
                    return Err(err(line, "COPY needs a source and a destination"));
                }
                let (dest, sources) = parts.split_last().expect("two or more");
                if let Some(bad) = sources.iter().find(|s| !safe_source(s)) {
                    return Err(err(
                        line,
                        format!("COPY source {bad:?} must be relative, without .."),
                    ));
                }
                Step::Copy {
                    sources: sources.iter().map(|s| s.to_string()).collect(),
                    dest: dest.to_string(),
                }
            }
            other => return Err(err(line, format!("unknown or empty instruction {other:?}"))),
        };
        steps.push(step);
        if steps.len() > MAX_STEPS {
            return Err(err(line, format!("more than {MAX_STEPS} steps")));
        }
    }
    if steps.is_empty() {
        return Err(err(0, "the recipe has no steps"));
    }
    Ok(steps)
}

/// Parse a healthcheck line.
pub fn parse_healthcheck(text: &str) -> Result<Healthcheck, RecipeError> {
    let mut h = Healthcheck {
        cmd: String::new(),
        interval: Duration::from_secs(3),
        timeout: Duration::from_secs(10),
        start_period: Duration::ZERO,
        retries: 0,
    };
    let mut rest = text.trim();
    while let Some(flag) = rest.strip_prefix("--") {
        let (f, tail) = flag.split_once(char::is_whitespace).unwrap_or((flag, ""));
        let (name, value) = f
            .split_once('=')
            .ok_or_else(|| err(1, format!("bad healthcheck flag --{f}")))?;
        let bad = || err(1, format!("bad value for --{name}: {value:?}"));
        match name {
            "interval" => h.interval = duration(value).ok_or_else(bad)?,
            "timeout" => h.timeout = duration(value).ok_or_else(bad)?,
            "start-period" => h.start_period = duration(value).ok_or_else(bad)?,
            "retries" => h.retries = value.parse().map_err(|_| bad())?,
            _ => return Err(err(1, format!("unknown healthcheck flag --{name}"))),
        }
        rest = tail.trim();
    }
    if rest.is_empty() {
        return Err(err(1, "the healthcheck needs a command"));
    }
    if h.interval.is_zero() {
        h.interval = Duration::from_millis(100);
    }
    h.cmd = rest.to_owned();
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_with_expansion_and_errors_name_the_line() {
        let r = "# a comment\nrun echo hi\nENV A=1\nENV B=${A}x$A$$\nWORKDIR /w/$B\nUSER dev\n\
                 RUN --timeout=30s make\nSTART server --port 1\nCOPY a b/c /dst\n";
        let s = parse(r).unwrap();
        assert_eq!(
            s[0],
            Step::Run {
                cmd: "echo hi".into(),
                timeout: DEFAULT_RUN_TIMEOUT
            }
        );
        assert_eq!(
            s[2],
            Step::Env {
                key: "B".into(),
                value: "1x1$".into()
            }
        );
        assert_eq!(
            s[3],
            Step::Workdir {
                path: "/w/1x1$".into()
            }
        );
        assert_eq!(
            s[5],
            Step::Run {
                cmd: "make".into(),
                timeout: Duration::from_secs(30)
            }
        );
        assert_eq!(
            s[7],
            Step::Copy {
                sources: vec!["a".into(), "b/c".into()],
                dest: "/dst".into()
            }
        );
        assert_eq!(parse("RUN\n").unwrap_err().line, 1);
        assert_eq!(parse("RUN ok\nFROM x\n").unwrap_err().line, 2);
        assert!(parse("COPY ../etc /x").is_err());
        assert!(parse("COPY /etc /x").is_err());
        assert!(parse("USER root;rm").is_err());
        assert!(parse("ENV 1A=b").is_err());
        assert!(parse("RUN --timeout=forever x").is_err());
        // (a whole-recipe error names no line)
        assert_eq!(
            parse("\n# only a comment\n").unwrap_err().to_string(),
            "the recipe has no steps"
        );
        assert_eq!(
            parse("RUN ok\nFROM x\n").unwrap_err().to_string(),
            "line 2: unknown or empty instruction \"FROM\""
        );
        assert_eq!(
            expand("${UNCLOSED", &BTreeMap::new(), 100).as_deref(),
            Some("${UNCLOSED")
        );
    }

    #[test]
    fn expansion_is_bounded() {
        // each line doubles A (12 bytes on line 1); lines 1..=16 hold
        // 12 * (2^16 - 1) bytes in all, line 17 would pass a MiB
        let mut text = String::from("ENV A=xxxxxxxxxxxx\n");
        for _ in 0..30 {
            text.push_str("ENV A=$A$A\n");
        }
        let e = parse(&text).unwrap_err();
        assert_eq!(e.line, 17, "{e}");
        assert!(e.msg.contains("expand to more than"), "{e}");
        // what fits is kept whole
        let steps = parse("ENV A=ab\nENV B=${A}c$A\nWORKDIR /w/$B\n").unwrap();
        assert_eq!(
            steps[2],
            Step::Workdir {
                path: "/w/abcab".into()
            }
        );
    }

    #[test]
    fn healthchecks_parse() {
        let h = parse_healthcheck("--interval=1s --timeout=2m curl -sf http://x/").unwrap();
        assert_eq!(h.interval, Duration::from_secs(1));
        assert_eq!(h.timeout, Duration::from_secs(120));
        assert_eq!(h.cmd, "curl -sf http://x/");
        assert!(parse_healthcheck("--retries=x cmd").is_err());
        assert!(parse_healthcheck("--interval=1s").is_err());
    }
}
