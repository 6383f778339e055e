//! Turning sampled token bytes into client text: complete UTF-8 only, and never text that
//! could still become a stop string.
//!
//! Each sequence owns one [`TextAssembler`]; the engine feeds it the bytes of each sampled
//! token and emits what it returns.

/// Accumulates token bytes and releases only complete UTF-8 characters.
#[derive(Debug, Default)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    /// Adds bytes; returns the longest complete prefix as text. Bytes that can never be valid
    /// UTF-8 become U+FFFD; an incomplete character at the end is kept for the next call.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[start..start + valid])
                            .expect("prefix checked valid"),
                    );
                    start += valid;
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += bad;
                        }
                        None => break, // an incomplete character: wait for more bytes
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Whatever is left at the end of generation, invalid bytes replaced.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

/// Holds back text that could still become one of the stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// The stop string that was found, once one was.
    matched: Option<String>,
}

/// What a push released.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop string was found: `text` ends right before it, and generation must stop.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
            matched: None,
        }
    }

    pub fn push(&mut self, text: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: text.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        // The earliest stop string wins.
        if let Some((at, stop)) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, _)| at)
        {
            self.matched = Some(stop.clone());
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let keep = self.longest_suffix_that_starts_a_stop();
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }

    /// The stop string found (the one `push` reported `stopped` for).
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Held-back text that never became a stop string, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn longest_suffix_that_starts_a_stop(&self) -> usize {
        let held = self.held.as_str();
        held.char_indices()
            .map(|(i, _)| &held[i..])
            .find(|suffix| self.stops.iter().any(|s| s.starts_with(suffix)))
            .map_or(0, str::len)
    }
}

/// Bytes in, releasable text out: UTF-8 assembly, then stop-string hold-back.
#[derive(Debug, Default)]
pub struct TextAssembler {
    utf8: Utf8Assembler,
    stops: StopMatcher,
}

impl TextAssembler {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            utf8: Utf8Assembler::default(),
            stops: StopMatcher::new(stops),
        }
    }

    pub fn push(&mut self, bytes: &[u8]) -> Released {
        let text = self.utf8.push(bytes);
        self.stops.push(&text)
    }

    /// The stop string that stopped the generation, if one did.
    pub fn stop_word(&self) -> Option<&str> {
        self.stops.matched()
    }

    /// Everything still held, at a finish that was not a stop string.
    pub fn finish(&mut self) -> String {
        let tail = self.utf8.finish();
        let mut released = self.stops.push(&tail);
        if released.stopped {
            return released.text;
        }
        released.text.push_str(&self.stops.finish());
        released.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_waits_for_a_split_character() {
        let mut a = Utf8Assembler::default();
        let euro = "€".as_bytes(); // three bytes
        assert_eq!(a.push(&euro[..1]), "");
        assert_eq!(a.push(&euro[1..2]), "");
        assert_eq!(a.push(&[euro[2], b'x']), "€x");
        assert_eq!(a.finish(), "");
    }

    #[test]
    fn utf8_replaces_invalid_bytes_and_flushes_incomplete_tail() {
        let mut a = Utf8Assembler::default();
        assert_eq!(a.push(&[b'a', 0xff, b'b']), "a\u{fffd}b");
        assert_eq!(a.push(&[0xe2, 0x82]), "");
        assert_eq!(a.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_string_across_pushes_is_never_emitted() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E").text, "hello ");
        assert_eq!(m.push("N").text, "");
        let r = m.push("D tail");
        assert_eq!(
            r,
            Released {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn the_matched_stop_string_is_known() {
        let mut a = TextAssembler::new(vec!["bc".into(), "a".into()]);
        assert!(!a.push(b"xxb").stopped);
        assert_eq!(a.stop_word(), None);
        assert!(a.push(b"ca").stopped);
        assert_eq!(a.stop_word(), Some("bc"), "the earliest match");
    }

    #[test]
    fn held_text_is_released_when_it_cannot_match() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("xE").text, "x");
        assert_eq!(m.push("Nx").text, "ENx");
        assert_eq!(m.push("EN").text, "");
        assert_eq!(m.finish(), "EN");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_suffixes_are_safe() {
        let mut m = StopMatcher::new(vec!["bc".into(), "a".into(), "é!".into()]);
        let r = m.push("xxbca");
        assert_eq!(
            r,
            Released {
                text: "xx".into(),
                stopped: true
            }
        );
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("café").text, "caf");
        assert_eq!(m.push("?").text, "é?");
    }

    #[test]
    fn assembler_combines_both() {
        let mut t = TextAssembler::new(vec!["€".into()]);
        let euro = "€".as_bytes();
        assert_eq!(t.push(b"a").text, "a");
        assert_eq!(t.push(&euro[..2]).text, "");
        assert!(t.push(&euro[2..]).stopped);
        let mut t = TextAssembler::new(vec!["zz".into()]);
        assert_eq!(t.push(b"az").text, "a");
        assert_eq!(t.finish(), "z");
    }
}
