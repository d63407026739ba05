//! A bounded JSON reader for the VERSION capabilities, the only JSON of the protocol.
//!
//! The input is at most [`crate::proto::MAX_CAPS_JSON`] bytes; nesting is limited to
//! [`MAX_DEPTH`]. Numbers are kept only when they are non-negative integers that fit a
//! u64 (anything else is [`Json::Other`]). No recursion deeper than [`MAX_DEPTH`], no
//! allocation beyond the size of the input.

/// Deepest nesting accepted (the capabilities are 3 levels deep).
pub const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json {
    Obj(Vec<(String, Json)>),
    Arr(Vec<Json>),
    Num(u64),
    Bool(bool),
    Str(String),
    Null,
    /// A number that is negative, fractional or too large.
    Other,
}

impl Json {
    /// The member `key` of an object (the first one, if repeated).
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Parse one JSON value that fills `s` (surrounding white space allowed).
pub fn parse(s: &[u8]) -> Result<Json, String> {
    let mut p = Parser { s, i: 0 };
    let v = p.value(0)?;
    p.ws();
    if p.i != s.len() {
        return Err(format!("trailing bytes at offset {}", p.i));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, b: u8) -> Result<(), String> {
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at offset {}", b as char, self.i))
        }
    }

    fn lit(&mut self, word: &[u8], v: Json) -> Result<Json, String> {
        if self.s.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(format!("bad literal at offset {}", self.i))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > MAX_DEPTH {
            return Err(format!("nesting deeper than {MAX_DEPTH}"));
        }
        self.ws();
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                let mut m = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(m));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    self.expect(b':')?;
                    let v = self.value(depth + 1)?;
                    m.push((k, v));
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(m));
                        }
                        _ => return Err(format!("expected ',' or '}}' at offset {}", self.i)),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(Json::Arr(a));
                }
                loop {
                    a.push(self.value(depth + 1)?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(a));
                        }
                        _ => return Err(format!("expected ',' or ']' at offset {}", self.i)),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.lit(b"true", Json::Bool(true)),
            Some(b'f') => self.lit(b"false", Json::Bool(false)),
            Some(b'n') => self.lit(b"null", Json::Null),
            Some(b'-' | b'0'..=b'9') => Ok(self.number()),
            _ => Err(format!("unexpected byte at offset {}", self.i)),
        }
    }

    fn number(&mut self) -> Json {
        let start = self.i;
        while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        let t = &self.s[start..self.i];
        if !t.is_empty() && t.iter().all(u8::is_ascii_digit) {
            // At most 20 digits fit; std's parser checks overflow.
            std::str::from_utf8(t)
                .ok()
                .and_then(|d| d.parse::<u64>().ok())
                .map_or(Json::Other, Json::Num)
        } else {
            Json::Other
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            let Some(b) = self.peek() else {
                return Err("unterminated string".into());
            };
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return Err("unterminated escape".into());
                    };
                    self.i += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            // Keys we look for are ASCII: keep a placeholder.
                            if self.s.get(self.i..self.i + 4).is_none() {
                                return Err("short \\u escape".into());
                            }
                            self.i += 4;
                            out.push(b'?');
                        }
                        _ => return Err(format!("bad escape at offset {}", self.i)),
                    }
                }
                0..=0x1f => return Err(format!("control byte in a string at offset {}", self.i)),
                _ => out.push(b),
            }
        }
        String::from_utf8(out).map_err(|_| "a string that is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_capabilities() {
        let s = br#"{"capabilities": {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456}, "max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": true}}"#;
        let v = parse(s).unwrap();
        let c = v.get("capabilities").unwrap();
        assert_eq!(c.get("max_msg_fds"), Some(&Json::Num(16)));
        assert_eq!(c.get("write_multiple"), Some(&Json::Bool(true)));
        assert_eq!(
            c.get("migration").unwrap().get("pgsize"),
            Some(&Json::Num(4096))
        );
    }

    #[test]
    fn refuses_bad_input() {
        for s in [
            &b""[..],
            b"{",
            b"{\"a\"}",
            b"{\"a\":1,}",
            b"[1,2",
            b"\"abc",
            b"{} x",
            b"tru",
        ] {
            assert!(parse(s).is_err(), "{:?}", String::from_utf8_lossy(s));
        }
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert!(parse(deep.as_bytes()).is_err());
        assert_eq!(parse(b"-1").unwrap(), Json::Other);
        assert_eq!(parse(b"99999999999999999999999").unwrap(), Json::Other);
        assert_eq!(parse(b"1.5").unwrap(), Json::Other);
    }
}
