//! A bounded pre-check of GBNF grammars (llama.cpp's format), run before llama.cpp sees one.
//!
//! llama.cpp's parser (`llama-grammar.cpp`) recurses once per nested group, expands every
//! repetition `x{m,n}` by copying `x`'s elements (`m` copies inline, then `n - m` nested
//! optional rules holding one copy each), loops without end on `x{m,n}` with `n < m`, and has
//! no limit of its own but 2000 repetitions of one item. A 200 KB grammar can therefore
//! overflow a thread's stack (a process abort) or expand to hundreds of millions of elements.
//! [`check`] scans the text the way that parser reads it, without building anything, and
//! refuses a grammar past [`MAX_NESTING`], [`MAX_RULES`], [`MAX_ELEMENTS`] or
//! [`MAX_START_PATHS`] (llama.cpp tracks one parse stack per way a rule may start, and compares
//! each new one with all the others); it runs in
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

use std::collections::HashMap;

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

/// Most ways one rule may start (an upper bound on the parse stacks llama.cpp creates when it
/// expands the rule: one per alternative, through each leading rule reference). llama.cpp keeps
/// every stack and looks each new one up among the others, so the cost is quadratic: 4096 stacks
/// took 0.2 s, 65 536 (a 400-byte grammar of 16 rules `r ::= s "a" | s "b"`) took 115 s.
pub const MAX_START_PATHS: u64 = 2048;

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
    /// The most ways a rule may start ([`MAX_START_PATHS`]; an upper bound).
    pub start_paths: u64,
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
            start_paths: 0,
        },
        names: HashMap::new(),
        rules: Vec::new(),
    };
    scanner.grammar()?;
    let root = scanner.names.get(b"root".as_slice());
    if root.is_none_or(|&id| scanner.rules[id].is_none()) {
        return Err("grammar has no `root` rule to start from".into());
    }
    let mut size = scanner.size;
    size.start_paths = start_paths(&scanner.rules);
    if size.start_paths > MAX_START_PATHS {
        return Err(format!(
            "grammar is too ambiguous: a rule may start in more than {MAX_START_PATHS} ways (through its alternatives and leading rule references)"
        ));
    }
    Ok(size)
}

struct Scanner<'a> {
    src: &'a [u8],
    pos: usize,
    depth: usize,
    size: GrammarSize,
    /// Rule ids by name (a name is given one when first seen, defined or not).
    names: HashMap<&'a [u8], usize>,
    /// Each rule's alternatives, by id (groups have ids too); `None` while undefined.
    rules: Vec<Option<Vec<Vec<Symbol>>>>,
}

/// One item of a sequence, with the repetitions applied to it (`x?{2}`: `[(0, Some(1)), (2,
/// Some(2))]`), kept flat so that no chain of them nests.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Symbol {
    base: Base,
    repeats: Vec<(u64, Option<u64>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// Characters, a class, a token or `.`; `true` when it matches only the empty string
    /// (`""`).
    Terminal(bool),
    Rule(usize),
}

impl Symbol {
    fn new(base: Base) -> Self {
        Self {
            base,
            repeats: Vec::new(),
        }
    }
}

/// Where the start-path count of each rule stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Paths {
    Todo,
    /// Being counted: met again, it is left recursion (which llama.cpp refuses).
    Active,
    Done {
        paths: u64,
        nullable: bool,
    },
}

/// The most ways any rule may start: for each alternative, the sum over its leading symbols
/// (up to the first that cannot match empty) of their own counts, plus one where the whole
/// alternative can match empty. Counted without recursion (an explicit stack), rules in any
/// order; an undefined or left-recursive reference counts as one way.
fn start_paths(rules: &[Option<Vec<Vec<Symbol>>>]) -> u64 {
    let mut state = vec![Paths::Todo; rules.len()];
    let mut most = 0;
    let mut stack = Vec::new();
    for first in 0..rules.len() {
        if state[first] != Paths::Todo {
            continue;
        }
        stack.push(first);
        while let Some(&rule) = stack.last() {
            if matches!(state[rule], Paths::Done { .. }) {
                stack.pop();
                continue;
            }
            state[rule] = Paths::Active;
            match count_rule(rules[rule].as_deref().unwrap_or(&[]), &state) {
                Ok((paths, nullable)) => {
                    state[rule] = Paths::Done { paths, nullable };
                    most = most.max(paths);
                    stack.pop();
                }
                Err(needed) => stack.extend(needed),
            }
        }
    }
    most
}

/// One rule's count and whether it can match empty, or the rules to count first (all those
/// this pass met, so that a rule is counted again only when a rule it starts with can match
/// empty).
fn count_rule(alternatives: &[Vec<Symbol>], state: &[Paths]) -> Result<(u64, bool), Vec<usize>> {
    let mut paths: u64 = 0;
    let mut nullable = false;
    let mut needed = Vec::new();
    for alternative in alternatives {
        let mut all_empty = true;
        for symbol in alternative {
            match count_symbol(symbol, state) {
                Ok((count, empty)) => {
                    paths = paths.saturating_add(count);
                    if !empty {
                        all_empty = false;
                        break;
                    }
                }
                Err(rule) => {
                    needed.push(rule);
                    all_empty = false;
                    break;
                }
            }
        }
        if all_empty {
            paths = paths.saturating_add(1);
            nullable = true;
        }
    }
    if needed.is_empty() {
        Ok((paths, nullable))
    } else {
        Err(needed)
    }
}

fn count_symbol(symbol: &Symbol, state: &[Paths]) -> Result<(u64, bool), usize> {
    let (mut paths, mut empty) = match symbol.base {
        Base::Terminal(empty) => (u64::from(!empty), empty),
        Base::Rule(id) => match state.get(id) {
            Some(Paths::Done { paths, nullable }) => (*paths, *nullable),
            Some(Paths::Todo) => return Err(id),
            // Left recursion, or a rule that does not exist: llama.cpp refuses either.
            Some(Paths::Active) | None => (1, false),
        },
    };
    for &(min, max) in &symbol.repeats {
        if empty {
            // Each copy may match empty, so the next one may start too.
            let copies = max.unwrap_or(2).max(min).max(1);
            paths = paths.saturating_mul(copies);
        }
        empty |= min == 0;
    }
    Ok((paths, empty))
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-'
}

impl<'a> Scanner<'a> {
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

    /// A rule name, as its id.
    fn name(&mut self) -> Result<usize, String> {
        let start = self.pos;
        while is_word(self.peek()) {
            self.pos += 1;
        }
        if self.pos == start {
            return self.fail("expecting a rule name");
        }
        let src: &'a [u8] = self.src;
        let name = &src[start..self.pos];
        let next = self.rules.len();
        let id = *self.names.entry(name).or_insert(next);
        if id == next {
            self.rules.push(None);
        }
        Ok(id)
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
        let id = self.name()?;
        self.space(false);
        if !self.src[self.pos..].starts_with(b"::=") {
            return self.fail("expecting ::=");
        }
        self.pos += 3;
        self.space(true);
        self.add_rule()?;
        let body = self.alternates(false)?;
        // A rule defined again replaces the earlier definition, as in llama.cpp.
        self.rules[id] = Some(body);
        match self.peek() {
            b'\r' => self.pos += if self.at(1) == b'\n' { 2 } else { 1 },
            b'\n' => self.pos += 1,
            0 if self.pos >= self.src.len() => {}
            _ => return self.fail("expecting a newline or the end"),
        }
        self.space(true);
        Ok(())
    }

    fn alternates(&mut self, nested: bool) -> Result<Vec<Vec<Symbol>>, String> {
        let mut alternatives = vec![self.sequence(nested)?];
        while self.peek() == b'|' {
            self.add(1)?;
            self.pos += 1;
            self.space(true);
            alternatives.push(self.sequence(nested)?);
        }
        self.add(1)?;
        Ok(alternatives)
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

    /// Past the closing quote or bracket of a literal or a class of `n` elements: counts
    /// them, adds the terminal to `symbols` and skips the space after it. Returns `n`, the
    /// elements a repetition of this item would copy.
    fn end_terminal(
        &mut self,
        n: u64,
        nested: bool,
        symbols: &mut Vec<Symbol>,
    ) -> Result<u64, String> {
        self.pos += 1;
        self.add(n)?;
        symbols.push(Symbol::new(Base::Terminal(n == 0)));
        self.space(nested);
        Ok(n)
    }

    fn sequence(&mut self, nested: bool) -> Result<Vec<Symbol>, String> {
        let mut symbols = Vec::new();
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
                    last = Some(self.end_terminal(n, nested, &mut symbols)?);
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
                    last = Some(self.end_terminal(n, nested, &mut symbols)?);
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
                    symbols.push(Symbol::new(Base::Terminal(false)));
                    self.space(nested);
                }
                c if is_word(c) => {
                    let id = self.name()?;
                    self.space(nested);
                    self.add(1)?;
                    last = Some(1);
                    symbols.push(Symbol::new(Base::Rule(id)));
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
                    let id = self.rules.len();
                    self.rules.push(None);
                    let body = self.alternates(true)?;
                    self.rules[id] = Some(body);
                    self.depth -= 1;
                    if self.peek() != b')' {
                        return self.fail("expecting ')'");
                    }
                    self.pos += 1;
                    self.add(1)?;
                    last = Some(1);
                    symbols.push(Symbol::new(Base::Rule(id)));
                    self.space(nested);
                }
                b'.' => {
                    self.pos += 1;
                    self.add(1)?;
                    last = Some(1);
                    symbols.push(Symbol::new(Base::Terminal(false)));
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
                    Self::repeated(&mut symbols, min, max);
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
                    Self::repeated(&mut symbols, min, max);
                }
                _ => return Ok(symbols),
            }
        }
    }

    /// Records a repetition on the last symbol ([`Self::repeat`] checked there is one).
    fn repeated(symbols: &mut [Symbol], min: u64, max: Option<u64>) {
        if let Some(last) = symbols.last_mut() {
            last.repeats.push((min, max));
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
            ("start ::= root", "no `root` rule"),
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
    fn ambiguous_grammars_are_refused() {
        // 16 rules `r ::= s "a" | s "b"`: 65 536 parse stacks, 115 s in llama.cpp.
        let layered = |levels: usize| {
            let mut g = String::from("root ::= r0\n");
            for i in 0..levels {
                g.push_str(&format!("r{i} ::= r{} \"a\" | r{} \"b\"\n", i + 1, i + 1));
            }
            g + &format!("r{levels} ::= \"c\"\n")
        };
        assert_eq!(check(&layered(11)).unwrap().start_paths, 2048);
        let error = check(&layered(16)).unwrap_err();
        assert!(error.contains("ambiguous"), "{error}");
        // The same, the rules defined bottom-up and through groups and nullable items.
        let mut g = String::new();
        for i in (0..16).rev() {
            g.push_str(&format!(
                "r{i} ::= (\"\" r{}) \"a\" | \"x\"? r{} \"b\"\n",
                i + 1,
                i + 1
            ));
        }
        g.push_str("r16 ::= \"c\"\nroot ::= r0\n");
        assert!(check(&g).unwrap_err().contains("ambiguous"));
        // A long chain starts one way; so does left recursion (llama.cpp refuses it).
        let mut chain = String::from("root ::= r0\n");
        for i in 0..9_000 {
            chain.push_str(&format!("r{i} ::= r{} \"x\"\n", i + 1));
        }
        chain.push_str("r9000 ::= \"a\"\n");
        assert_eq!(check(&chain).unwrap().start_paths, 1);
        check("root ::= root \"a\" | \"b\"").unwrap();
        // Nullable repetitions multiply; bounded ones stay small.
        assert_eq!(check("root ::= (\"a\"?){3} \"b\"").unwrap().start_paths, 7);
        assert!(check("root ::= ((\"a\" | \"b\")?){2000}")
            .unwrap_err()
            .contains("ambiguous"));
    }

    #[test]
    fn repetitions_llama_cpp_mishandles_are_refused() {
        // llama.cpp computes max - min unsigned: an endless loop.
        assert!(check("root ::= \"x\"{5,3}").unwrap_err().contains("below"));
        assert!(check("root ::= \"x\"{2001}").unwrap_err().contains("2000"));
        assert!(check("root ::= \"x\"{99999999999999999999999}").is_err());
    }
}
