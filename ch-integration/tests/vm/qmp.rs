//! A small QMP client over a UNIX socket, and the bit of JSON it needs.
//!
//! QMP interleaves asynchronous events (`{"event": ...}`) with command
//! replies; [`Qmp::execute`] tags every command with an `id`, queues the
//! events it reads on the way, and [`Qmp::wait_event`] serves them later.

use std::collections::VecDeque;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A JSON value. Numbers keep their text, so 64-bit values survive.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// An object from `(key, value)` pairs.
    pub fn obj<'a>(pairs: impl IntoIterator<Item = (&'a str, Json)>) -> Json {
        Json::Obj(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    /// A string value.
    pub fn str(s: impl Into<String>) -> Json {
        Json::Str(s.into())
    }

    /// Member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Num(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn as_array(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            _ => &[],
        }
    }

    /// Parses one JSON document (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing characters at {} in {text:?}", p.i));
        }
        Ok(v)
    }
}

fn write_json_str(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

/// Compact serialisation.
impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Json::Null => f.write_str("null"),
            Json::Bool(b) => write!(f, "{b}"),
            Json::Num(n) => f.write_str(n),
            Json::Str(s) => write_json_str(f, s),
            Json::Arr(a) => {
                f.write_str("[")?;
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Json::Obj(m) => {
                f.write_str("{")?;
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write_json_str(f, k)?;
                    write!(f, ":{v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("JSON: {what} at byte {}", self.i))
    }

    fn lit(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            self.err("bad literal")
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            None => self.err("unexpected end"),
            Some(b'n') => self.lit("null", Json::Null),
            Some(b't') => self.lit("true", Json::Bool(true)),
            Some(b'f') => self.lit("false", Json::Bool(false)),
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b'[') => {
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(a));
                }
                loop {
                    a.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(a));
                        }
                        _ => return self.err("expected , or ]"),
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                let mut m = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(m));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return self.err("expected a key");
                    }
                    let k = self.string()?;
                    self.ws();
                    if self.s.get(self.i) != Some(&b':') {
                        return self.err("expected :");
                    }
                    self.i += 1;
                    let v = self.value()?;
                    m.push((k, v));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(m));
                        }
                        _ => return self.err("expected , or }"),
                    }
                }
            }
            Some(c) if *c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                Ok(Json::Num(
                    String::from_utf8_lossy(&self.s[start..self.i]).into_owned(),
                ))
            }
            Some(_) => self.err("unexpected character"),
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self
            .s
            .get(self.i..self.i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok());
        match h {
            Some(v) => {
                self.i += 4;
                Ok(v)
            }
            None => self.err("bad \\u escape"),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // opening quote
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else {
                return self.err("unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else {
                        return self.err("unterminated escape");
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xd800..0xdc00).contains(&cp)
                                && self.s[self.i..].starts_with(b"\\u")
                            {
                                self.i += 2;
                                let lo = self.hex4()?;
                                cp = 0x10000
                                    + ((cp - 0xd800) << 10)
                                    + (lo.wrapping_sub(0xdc00) & 0x3ff);
                            }
                            char::from_u32(cp).unwrap_or('\u{fffd}')
                        }
                        _ => return self.err("bad escape"),
                    };
                    let mut b = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|e| format!("JSON: bad UTF-8 in string: {e}"))
    }
}

/// A failed QMP command.
#[derive(Debug)]
pub enum QmpError {
    /// QEMU answered `{"error": {"class": ..., "desc": ...}}`.
    Command { class: String, desc: String },
    /// The socket failed, closed or timed out.
    Io(String),
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpError::Command { class, desc } => write!(f, "QMP error {class}: {desc}"),
            QmpError::Io(e) => write!(f, "QMP I/O: {e}"),
        }
    }
}

/// A QMP connection in command mode.
pub struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    /// Events read but not yet consumed by `wait_event`.
    pub events: VecDeque<Json>,
    /// QEMU's greeting (`{"QMP": {"version": ...}}`).
    pub greeting: Json,
    /// Every message sent and received, for failure reports.
    pub transcript: Vec<String>,
}

/// How long one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connects (retrying until the socket accepts, at most `timeout`),
    /// reads the greeting and enters command mode with `qmp_capabilities`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(format!("connect {}: {e}", path.display())),
            }
        };
        let mut q = Qmp {
            stream,
            buf: Vec::new(),
            next_id: 1,
            events: VecDeque::new(),
            greeting: Json::Null,
            transcript: Vec::new(),
        };
        q.greeting = q.read_msg(deadline)?;
        if q.greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting {}", q.greeting));
        }
        q.execute("qmp_capabilities", None)
            .map_err(|e| e.to_string())?;
        Ok(q)
    }

    /// Reads one message (one line), waiting at most until `deadline`.
    fn read_msg(&mut self, deadline: Instant) -> Result<Json, String> {
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = String::from_utf8_lossy(&line).trim().to_string();
                if text.is_empty() {
                    continue;
                }
                self.transcript.push(format!("<< {text}"));
                return Json::parse(&text);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err("timed out waiting for a QMP message".into());
            }
            self.stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("QMP connection closed by QEMU".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("QMP read: {e}")),
            }
        }
    }

    /// Runs `command` with optional `arguments` and returns its `return`
    /// value. Events that arrive meanwhile are queued.
    pub fn execute(&mut self, command: &str, arguments: Option<Json>) -> Result<Json, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = vec![
            ("execute", Json::str(command)),
            ("id", Json::Num(id.to_string())),
        ];
        if let Some(a) = arguments {
            msg.push(("arguments", a));
        }
        let text = format!("{}\n", Json::obj(msg));
        self.transcript.push(format!(">> {}", text.trim_end()));
        self.stream
            .write_all(text.as_bytes())
            .map_err(|e| QmpError::Io(format!("write: {e}")))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let m = self.read_msg(deadline).map_err(QmpError::Io)?;
            if m.get("event").is_some() {
                self.events.push_back(m);
                continue;
            }
            if m.get("id").and_then(Json::as_i64) != Some(id as i64) {
                // A reply to nothing we sent: keep it for the transcript only.
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    class: e.get("class").and_then(Json::as_str).unwrap_or("?").into(),
                    desc: e.get("desc").and_then(Json::as_str).unwrap_or("?").into(),
                });
            }
            return Err(QmpError::Io(format!("unexpected QMP message {m}")));
        }
    }

    /// Waits for event `name` whose message satisfies `pred` (queued ones
    /// first), at most `timeout`.
    pub fn wait_event(
        &mut self,
        name: &str,
        pred: impl Fn(&Json) -> bool,
        timeout: Duration,
    ) -> Result<Json, String> {
        let matches = |e: &Json| e.get("event").and_then(Json::as_str) == Some(name) && pred(e);
        if let Some(i) = self.events.iter().position(matches) {
            return Ok(self.events.remove(i).unwrap());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let m = self
                .read_msg(deadline)
                .map_err(|e| format!("waiting for event {name}: {e}"))?;
            if m.get("event").is_none() {
                continue;
            }
            if matches(&m) {
                return Ok(m);
            }
            self.events.push_back(m);
        }
    }
}

/// The device with `qdev_id == id` in a `query-pci` answer, searched
/// through bridges too.
pub fn find_pci_device<'a>(query_pci: &'a Json, id: &str) -> Option<&'a Json> {
    fn walk<'a>(devices: &'a [Json], id: &str) -> Option<&'a Json> {
        for d in devices {
            if d.get("qdev_id").and_then(Json::as_str) == Some(id) {
                return Some(d);
            }
            if let Some(bus) = d.get("pci_bridge").and_then(|b| b.get("bus")) {
                if let Some(found) = walk(bus.get("devices").map_or(&[], Json::as_array), id) {
                    return Some(found);
                }
            }
            if let Some(devs) = d.get("pci_bridge").and_then(|b| b.get("devices")) {
                if let Some(found) = walk(devs.as_array(), id) {
                    return Some(found);
                }
            }
        }
        None
    }
    query_pci
        .as_array()
        .iter()
        .find_map(|bus| walk(bus.get("devices").map_or(&[], Json::as_array), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let t = r#"{"a": [1, -1, 4273995775, 1.5e3], "b": {"c": "x\"\\\u00e9\ud83d\ude00"}, "d": true, "e": null}"#;
        let v = Json::parse(t).unwrap();
        assert_eq!(v.get("a").unwrap().as_array()[1].as_i64(), Some(-1));
        assert_eq!(v.get("a").unwrap().as_array()[2].as_i64(), Some(4273995775));
        assert_eq!(
            v.get("b").unwrap().get("c").unwrap().as_str(),
            Some("x\"\\é😀")
        );
        assert_eq!(Json::parse(&v.to_string()).unwrap(), v);
        assert!(Json::parse("{\"a\":}").is_err());
        assert!(Json::parse("[1] x").is_err());
    }
}
