//! A bounded pre-check of GBNF grammars (llama.cpp's format), run before llama.cpp sees one.
//!
//! llama.cpp's parser (`llama-grammar.cpp`) recurses once per nested group, expands every
//! repetition `x{m,n}` by copying `x`'s elements (`m` copies inline, then `n - m` nested
//! optional rules holding one copy each), loops without end on `x{m,n}` with `n < m`, and has
//! no limit of its own but 2000 repetitions of one item. A 200 KB grammar can therefore
//! overflow a thread's stack (a process abort) or expand to hundreds of millions of elements.
//! [`check`] scans the text the way that parser reads it, without building anything, and
//! refuses a grammar past [`MAX_NESTING`], [`MAX_RULES`] or [`MAX_ELEMENTS`]; it runs in
//! `SamplingParams::validate`, so in the router (a 400 naming `grammar`) and again in the
//! worker before llama.cpp parses the grammar. It is not a full validator: what it lets pass,
//! llama.cpp may still refuse (an undefined rule, left recursion), and the worker turns that
//! into a request error too.
//!
//! Grammar syntax, as llama.cpp reads it: rules `name ::= alternatives` ending at a newline,
//! alternatives separated by `|`, sequences of literals `"…"` (escapes `\x..`, `\u....`,
//! `\U........`, `\t \r \n \\ \" \[ \] \-`), classes `[…]` / `[^…]` with ranges, tokens `<…>` /
//! `!<…>`, rule names (`[a-zA-Z0-9-]+`), `.`, groups `( … )` (newlines allowed inside), each
//! optionally followed by `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`; `#` starts a comment.

/// Deepest nesting of groups `( … )` inside one another.
pub const MAX_NESTING: usize = 128;

/// Most rules, named ones and groups (each group is a rule of its own in llama.cpp); the rules
/// a repetition generates count as elements instead.
pub const MAX_RULES: usize = 10_000;

/// Most grammar elements after llama.cpp expands repetitions (one per literal character, class
/// character or range end, reference, alternative and rule end). llama.cpp parses about this
/// many in a few tens of milliseconds, into some 8 MiB; llama-server's JSON-schema grammars use
/// a few thousand (a string with `maxLength: 1000` is about 4000).
pub const MAX_ELEMENTS: u64 = 1 << 20;

/// llama.cpp's own limit on a repetition count (`MAX_REPETITION_THRESHOLD`): a larger minimum
/// is an error, a larger maximum means no maximum.
pub const MAX_REPETITION: u64 = 2000;

/// What a grammar that passed [`check`] will cost llama.cpp to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrammarSize {
    /// Named rules and groups.
    pub rules: usize,
    /// Elements after repetitions are expanded (an upper bound).
    pub elements: u64,
    /// Deepest group nesting.
    pub nesting: usize,
}

/// Scans `grammar` and refuses one that llama.cpp could not parse safely or cheaply. The error
/// is a short sentence for the client; it never quotes the grammar (only a byte offset).
pub fn check(grammar: &str) -> Result<GrammarSize, String> {
    let mut scanner = Scanner {
        src: grammar.as_bytes(),
        pos: 0,
        depth: 0,
        size: GrammarSize {
            rules: 0,
            elements: 0,
            nesting: 0,
        },
        has_root: false,
    };
    scanner.grammar()?;
    if !scanner.has_root {
        return Err("grammar has no `root` rule to start from".into());
    }
    Ok(scanner.size)
}

struct Scanner<'a> {
    src: &'a [u8],
    pos: usize,
    depth: usize,
    size: GrammarSize,
    has_root: bool,
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-'
}

impl Scanner<'_> {
    fn peek(&self) -> u8 {
        self.at(0)
    }

    fn at(&self, offset: usize) -> u8 {
        self.src.get(self.pos + offset).copied().unwrap_or(0)
    }

    fn fail<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("grammar syntax error at byte {}: {what}", self.pos))
    }

    fn add(&mut self, elements: u64) -> Result<(), String> {
        self.size.elements = self.size.elements.saturating_add(elements);
        if self.size.elements > MAX_ELEMENTS {
            return Err(format!(
                "grammar expands to more than {MAX_ELEMENTS} elements (each repetition x{{m,n}} copies x up to n times)"
            ));
        }
        Ok(())
    }

    fn add_rule(&mut self) -> Result<(), String> {
        self.size.rules += 1;
        if self.size.rules > MAX_RULES {
            return Err(format!(
                "grammar has more than {MAX_RULES} rules (counting each parenthesized group)"
            ));
        }
        Ok(())
    }

    /// llama.cpp's `parse_space`: blanks and comments, and line ends where `newline_ok`.
    fn space(&mut self, newline_ok: bool) {
        loop {
            match self.peek() {
                b' ' | b'\t' => self.pos += 1,
                b'\r' | b'\n' if newline_ok => self.pos += 1,
                b'#' => {
                    while !matches!(self.peek(), 0 | b'\r' | b'\n') {
                        self.pos += 1;
                    }
                }
                _ => return,
            }
        }
    }

    fn name(&mut self) -> Result<&[u8], String> {
        let start = self.pos;
        while is_word(self.peek()) {
            self.pos += 1;
        }
        if self.pos == start {
            return self.fail("expecting a rule name");
        }
        Ok(&self.src[start..self.pos])
    }

    fn int(&mut self) -> Result<u64, String> {
        let start = self.pos;
        let mut value: u64 = 0;
        while self.peek().is_ascii_digit() {
            value = value
                .saturating_mul(10)
                .saturating_add(u64::from(self.peek() - b'0'));
            self.pos += 1;
        }
        if self.pos == start {
            return self.fail("expecting an integer");
        }
        Ok(value)
    }

    fn grammar(&mut self) -> Result<(), String> {
        self.space(true);
        while self.pos < self.src.len() {
            self.rule()?;
        }
        Ok(())
    }

    fn rule(&mut self) -> Result<(), String> {
        if self.name()? == b"root" {
            self.has_root = true;
        }
        self.space(false);
        if !self.src[self.pos..].starts_with(b"::=") {
            return self.fail("expecting ::=");
        }
        self.pos += 3;
        self.space(true);
        self.add_rule()?;
        self.alternates(false)?;
        match self.peek() {
            b'\r' => self.pos += if self.at(1) == b'\n' { 2 } else { 1 },
            b'\n' => self.pos += 1,
            0 if self.pos >= self.src.len() => {}
            _ => return self.fail("expecting a newline or the end"),
        }
        self.space(true);
        Ok(())
    }

    fn alternates(&mut self, nested: bool) -> Result<(), String> {
        self.sequence(nested)?;
        while self.peek() == b'|' {
            self.add(1)?;
            self.pos += 1;
            self.space(true);
            self.sequence(nested)?;
        }
        self.add(1)
    }

    /// One character of a literal or class (an escape or a UTF-8 sequence).
    fn char(&mut self) -> Result<(), String> {
        match self.peek() {
            0 if self.pos >= self.src.len() => self.fail("unexpected end of input"),
            b'\\' => {
                let digits = match self.at(1) {
                    b'x' => 2,
                    b'u' => 4,
                    b'U' => 8,
                    b't' | b'r' | b'n' | b'\\' | b'"' | b'[' | b']' | b'-' => 0,
                    _ => return self.fail("unknown escape"),
                };
                self.pos += 2;
                for _ in 0..digits {
                    if !self.peek().is_ascii_hexdigit() {
                        return self.fail("expecting hex digits");
                    }
                    self.pos += 1;
                }
                Ok(())
            }
            _ => {
                // One code point: a lead byte and its continuation bytes.
                self.pos += 1;
                while self.peek() & 0xC0 == 0x80 {
                    self.pos += 1;
                }
                Ok(())
            }
        }
    }

    fn sequence(&mut self, nested: bool) -> Result<(), String> {
        // Elements of the item a repetition would copy; `None` before the first item.
        let mut last: Option<u64> = None;
        loop {
            match self.peek() {
                b'"' => {
                    self.pos += 1;
                    let mut n = 0;
                    while self.peek() != b'"' {
                        self.char()?;
                        n += 1;
                    }
                    self.pos += 1;
                    self.add(n)?;
                    last = Some(n);
                    self.space(nested);
                }
                b'[' => {
                    self.pos += 1;
                    if self.peek() == b'^' {
                        self.pos += 1;
                    }
                    let mut n = 0;
                    while self.peek() != b']' {
                        self.char()?;
                        n += 1;
                        if self.peek() == b'-' && self.at(1) != b']' {
                            self.pos += 1;
                            self.char()?;
                            n += 1;
                        }
                    }
                    self.pos += 1;
                    self.add(n)?;
                    last = Some(n);
                    self.space(nested);
                }
                b'<' | b'!' => {
                    if self.peek() == b'!' {
                        self.pos += 1;
                    }
                    if self.peek() != b'<' {
                        return self.fail("expecting '<'");
                    }
                    while !matches!(self.peek(), 0 | b'>') {
                        self.pos += 1;
                    }
                    if self.peek() != b'>' {
                        return self.fail("expecting '>'");
                    }
                    self.pos += 1;
                    self.add(1)?;
                    last = Some(1);
                    self.space(nested);
                }
                c if is_word(c) => {
                    self.name()?;
                    self.space(nested);
                    self.add(1)?;
                    last = Some(1);
                }
                b'(' => {
                    self.pos += 1;
                    self.space(true);
                    self.depth += 1;
                    if self.depth > MAX_NESTING {
                        return Err(format!("grammar nests groups more than {MAX_NESTING} deep"));
                    }
                    self.size.nesting = self.size.nesting.max(self.depth);
                    self.add_rule()?;
                    self.alternates(true)?;
                    self.depth -= 1;
                    if self.peek() != b')' {
                        return self.fail("expecting ')'");
                    }
                    self.pos += 1;
                    self.add(1)?;
                    last = Some(1);
                    self.space(nested);
                }
                b'.' => {
                    self.pos += 1;
                    self.add(1)?;
                    last = Some(1);
                    self.space(nested);
                }
                b'*' | b'+' | b'?' => {
                    let (min, max) = match self.peek() {
                        b'*' => (0, None),
                        b'+' => (1, None),
                        _ => (0, Some(1)),
                    };
                    self.pos += 1;
                    self.space(nested);
                    last = Some(self.repeat(last, min, max)?);
                }
                b'{' => {
                    self.pos += 1;
                    self.space(nested);
                    let min = self.int()?;
                    self.space(nested);
                    let max = match self.peek() {
                        b'}' => Some(min),
                        b',' => {
                            self.pos += 1;
                            self.space(nested);
                            let max = if self.peek().is_ascii_digit() {
                                let max = self.int()?;
                                self.space(nested);
                                Some(max)
                            } else {
                                None
                            };
                            if self.peek() != b'}' {
                                return self.fail("expecting '}'");
                            }
                            max
                        }
                        _ => return self.fail("expecting ',' or '}'"),
                    };
                    self.pos += 1;
                    self.space(nested);
                    if min > MAX_REPETITION {
                        return Err(format!(
                            "grammar repeats an item more than {MAX_REPETITION} times"
                        ));
                    }
                    if max.is_some_and(|max| max < min) {
                        return Err(
                            "grammar has a repetition {m,n} whose maximum is below its minimum"
                                .into(),
                        );
                    }
                    // llama.cpp: a maximum above its limit means no maximum.
                    let max = max.filter(|&max| max <= MAX_REPETITION);
                    last = Some(self.repeat(last, min, max)?);
                }
                _ => return Ok(()),
            }
        }
    }

    /// llama.cpp's rewrite of `S{min,max}`: `S` copied `min` times inline, then one reference
    /// to the first of `max - min` generated rules `S'(k) ::= S S'(k-1) |` (one `S' ::= S S' |`
    /// without a maximum). Returns the elements the repeated item now has in its sequence.
    fn repeat(&mut self, last: Option<u64>, min: u64, max: Option<u64>) -> Result<u64, String> {
        let Some(size) = last.filter(|&size| size > 0) else {
            return self.fail("expecting an item before a repetition");
        };
        let optional = max.map_or(1, |max| max - min);
        let inline = size.saturating_mul(min) + u64::from(optional > 0);
        // The item's own elements were counted when it was read: an upper bound.
        self.add(inline)?;
        self.add(optional.saturating_mul(size + 3))?;
        Ok(inline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_grammars_pass() {
        for grammar in [
            "root ::= \"yes\" | \"no\"",
            "root ::= [a-z]+ (\",\" [a-z]+)*\n",
            "# a comment\nroot ::= item{2,5} # trailing\nitem ::= [^\\x00-\\x1F\"\\\\] | \"\\u00e9\"\n",
            "root ::= (\n  \"a\" |\n  \"b\"\n)? .\r\n",
            "root ::= <think> !<[12]>* \"ü\"{3}",
            "root ::= x{0,}\nx ::= [0-9]{1,16}",
            "root ::= \"a\"{5,2001}",
            "root ::= a\r\na ::= \"x\" | ( # c\r\n \"y\" )\r\n",
            "root ::= [a-] [-a] [\\-] \"\\x41\\u00e9\\U0001F600\"",
            "root ::= [a-z]{2,5} \"b\"{0,} (\"c\" | \"d\"){3} x{ 1 , 2 }\nx ::= \"e\"",
        ] {
            check(grammar).unwrap_or_else(|e| panic!("{grammar:?}: {e}"));
        }
        let size = check("root ::= \"ab\"{3} ((\"c\"))").unwrap();
        assert_eq!(size.rules, 3);
        assert_eq!(size.nesting, 2);
    }

    #[test]
    fn syntax_errors_give_an_offset_and_no_text() {
        for (grammar, what) in [
            ("root = \"x\"", "expecting ::="),
            ("root ::= \"x", "unexpected end"),
            ("root ::= (\"x\"", "expecting ')'"),
            ("root ::= \"\\q\"", "unknown escape"),
            ("root ::= * \"x\"", "expecting an item"),
            ("root ::= \"\"{3}", "expecting an item"),
            ("root ::= \"x\"{3", "expecting ',' or '}'"),
            ("root ::= \"x\" ) ", "expecting a newline"),
            ("start ::= \"x\"", "no `root` rule"),
            ("", "no `root` rule"),
        ] {
            let error = check(grammar).unwrap_err();
            assert!(error.contains(what), "{grammar:?}: {error}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_before_any_recursion() {
        let ok = format!(
            "root ::= {}\"a\"{}",
            "(".repeat(MAX_NESTING),
            ")".repeat(MAX_NESTING)
        );
        assert_eq!(check(&ok).unwrap().nesting, MAX_NESTING);
        // The attack: 100 000 nested groups, which overflow llama.cpp's parser's stack.
        let bomb = format!(
            "root ::= {}\"a\"{}",
            "(".repeat(100_000),
            ")".repeat(100_000)
        );
        let error = check(&bomb).unwrap_err();
        assert!(error.contains("more than 128 deep"), "{error}");
        assert!(error.len() < 100);
    }

    #[test]
    fn too_many_rules_are_refused() {
        let mut many = String::from("root ::= r0\n");
        for i in 0..MAX_RULES {
            many.push_str(&format!("r{i} ::= \"x\"\n"));
        }
        assert!(check(&many).unwrap_err().contains("rules"));
        let groups = format!("root ::= {}", "(\"a\") ".repeat(MAX_RULES));
        assert!(check(&groups).unwrap_err().contains("rules"));
    }

    #[test]
    fn repetition_bombs_are_refused() {
        // The attack: a 1000-character literal repeated 2000 times, 250 times over, would be
        // 500 million elements.
        let item = format!("\"{}\"{{2000}} ", "x".repeat(1000));
        let bomb = format!("root ::= {}", item.repeat(250));
        assert!(bomb.len() < 256 * 1024);
        let error = check(&bomb).unwrap_err();
        assert!(error.contains("elements"), "{error}");
        // Already one copy is too many; 500 are fine.
        assert!(check(&format!("root ::= \"{}\"{{2000}}", "x".repeat(1000))).is_err());
        check(&format!("root ::= \"{}\"{{500}}", "x".repeat(1000))).unwrap();
        // Optional copies count too, and chained repetitions multiply.
        assert!(check(&format!("root ::= \"{}\"{{0,1999}}", "x".repeat(1000))).is_err());
        assert!(check(&format!("root ::= \"{}\"{{40}}{{40}}", "x".repeat(1000))).is_err());
        // A group is one reference, whatever is inside it.
        check(&format!("root ::= (\"{}\"){{2000}}", "x".repeat(1000))).unwrap();
    }

    proptest::proptest! {
        /// Any text: an answer, never a panic (a slice out of range, an overflow).
        #[test]
        fn any_text_is_answered(text in "(root ::= |[\"\\\\\\[\\]()|*+?{},0-9a-z#\n\r\t ^.<>!-]|é){0,80}") {
            let _ = check(&text);
        }
    }

    #[test]
    fn repetitions_llama_cpp_mishandles_are_refused() {
        // llama.cpp computes max - min unsigned: an endless loop.
        assert!(check("root ::= \"x\"{5,3}").unwrap_err().contains("below"));
        assert!(check("root ::= \"x\"{2001}").unwrap_err().contains("2000"));
        assert!(check("root ::= \"x\"{99999999999999999999999}").is_err());
    }
}
