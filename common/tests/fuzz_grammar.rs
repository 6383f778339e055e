//! Fuzz target for the GBNF pre-check (`llamapool_common::gbnf::check`, run by
//! `SamplingParams::validate` on every client's grammar): arbitrary text, grammar-shaped text
//! (GBNF's pieces in any order), generated grammars with nested groups and repetitions, and
//! large ones near the size limit. The properties: nothing panics; each call returns within a
//! time bound; a grammar that passes is within the limits the check promises.
//!
//! These are property tests (proptest) named `fuzz_*`: `cargo test` runs a few hundred cases
//! each; `scripts/fuzz` runs them for a fixed time (`LLAMAPOOL_FUZZ_SECONDS`) or case count
//! (`LLAMAPOOL_FUZZ_CASES`). A crasher found becomes a plain `#[test]` below.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llamapool_common::gbnf;
use llamapool_common::SamplingParams;
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;

mod fuzz_support;
use fuzz_support::fuzz;

/// Longest one check may take. It is a linear scan (256 KiB in well under a millisecond); the
/// bound catches a blow-up, with room for a loaded CI machine that pauses the thread.
const MAX_CHECK_TIME: Duration = Duration::from_secs(2);

/// Grammars that passed the check, over all targets (a generator whose cases all fail early
/// would test little past the first byte).
static ACCEPTED: AtomicU64 = AtomicU64::new(0);

/// Checks `grammar` directly and through `SamplingParams::validate`.
fn check(grammar: &str) -> TestCaseResult {
    let start = Instant::now();
    let direct = gbnf::check(grammar);
    let took = start.elapsed();
    prop_assert!(took <= MAX_CHECK_TIME, "gbnf::check took {took:?}");
    if let Ok(size) = &direct {
        ACCEPTED.fetch_add(1, Ordering::Relaxed);
        prop_assert!(size.nesting <= gbnf::MAX_NESTING, "{size:?}");
        prop_assert!(size.rules <= gbnf::MAX_RULES, "{size:?}");
        prop_assert!(size.elements <= gbnf::MAX_ELEMENTS, "{size:?}");
        prop_assert!(size.start_paths <= gbnf::MAX_START_PATHS, "{size:?}");
    }
    let params = SamplingParams {
        grammar: Some(grammar.to_string()),
        ..SamplingParams::default()
    };
    let start = Instant::now();
    let validated = params.validate();
    let took = start.elapsed();
    prop_assert!(took <= MAX_CHECK_TIME, "validate took {took:?}");
    if validated.is_ok() {
        prop_assert!(direct.is_ok(), "validate passed what gbnf::check refused");
        prop_assert!(grammar.len() <= SamplingParams::MAX_GRAMMAR_BYTES);
    }
    if let Err(e) = validated {
        prop_assert_eq!(e.param, "grammar");
    }
    Ok(())
}

/// One GBNF piece: punctuation, literals with good and broken escapes, classes, tokens,
/// repetitions with counts around llama.cpp's limits, comments and line ends.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "root", " ::= ", "::=", ":", "(", ")", "|", "*", "+", "?", "{", "}", ",", "\"", "\\",
            "[", "]", "[^", "-", "<", ">", "!<", "!", ".", "#", "# a comment\n", "\n", "\r",
            "\r\n", " ", "\t", "a", "x", "rule-1", "root-2", "\"abc\"", "\"\"", "\"\\x41\"",
            "\"\\u00e9\"", "\"\\U0001F999\"", "\"\\x4\"", "\"\\u12\"", "\"\\q\"", "\"\\",
            "[a-z]", "[z-a]", "[^\"\\\\]", "[\\x00-\\x1F]", "[]", "[-]", "<|tok|>", "<[123]>",
            "!<[5]>", "<", "☕", "é", "\u{feff}", "\u{10ffff}",
        ])
        .prop_map(String::from),
        3 => (0u64..6, prop::option::of(prop::option::of(0u64..6))).prop_map(|(m, n)| match n {
            None => format!("{{{m}}}"),
            Some(None) => format!("{{{m},}}"),
            Some(Some(n)) => format!("{{{m},{n}}}"),
        }),
        1 => prop::sample::select(vec![
            "{1999}",
            "{2000}",
            "{2001}",
            "{0,2000}",
            "{2000,}",
            "{1,2001}",
            "{4294967296}",
            "{18446744073709551616}",
            "{99999999999999999999999}",
            "{5,1}",
            "{,3}",
            "{ 2 , 3 }",
            "{-1}",
        ])
        .prop_map(String::from),
        1 => "[a-zA-Z0-9-]{1,12}",
        1 => any::<String>(),
    ]
}

fn shaped() -> impl Strategy<Value = String> {
    (0u8..3, prop::collection::vec(piece(), 0..80)).prop_map(|(start, pieces)| {
        let body = pieces.concat();
        match start {
            0 => body,
            1 => format!("root ::= {body}"),
            _ => format!("root ::= x\nx ::= {body}"),
        }
    })
}

/// A grammar expression: nested groups, alternatives and repetitions of small atoms.
fn expression() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        "\"[a-z]{0,4}\"",
        Just("[a-z]".to_string()),
        Just("[^x]".to_string()),
        Just(".".to_string()),
        Just("<|tok|>".to_string()),
        // References: to rules defined below (some matching empty), to `root` (recursion, left
        // recursion), to a rule that does not exist; the start-path count follows them.
        prop::sample::select(vec![
            "r1",
            "rule0",
            "rule1",
            "rule2",
            "root",
            "undefined",
            "\"\""
        ])
        .prop_map(String::from),
    ];
    let repetition = prop_oneof![
        4 => Just(String::new()),
        1 => prop::sample::select(vec!["*", "+", "?"]).prop_map(String::from),
        2 => (0u64..2001, prop::option::of(0u64..2001)).prop_map(|(m, n)| match n {
            Some(n) => format!("{{{m},{}}}", n.max(m)),
            None => format!("{{{m}}}"),
        }),
    ];
    (atom, repetition.clone())
        .prop_map(|(a, r)| format!("{a}{r}"))
        .prop_recursive(12, 200, 4, move |inner| {
            (
                prop::collection::vec(prop::collection::vec(inner, 1..4), 1..4),
                repetition.clone(),
            )
                .prop_map(|(alternatives, r)| {
                    let alts: Vec<String> = alternatives.iter().map(|seq| seq.join(" ")).collect();
                    format!("({}){r}", alts.join(" | "))
                })
        })
}

fn generated() -> impl Strategy<Value = String> {
    (expression(), prop::collection::vec(expression(), 0..4)).prop_map(|(root, more)| {
        let mut out = format!("root ::= {root}\nr1 ::= \"x\" | \"\"\n");
        for (i, e) in more.iter().enumerate() {
            out.push_str(&format!("rule{i} ::= {e}\n"));
        }
        out
    })
}

/// Grammars built to cost the start-path count the most: `n` rules that may match empty (or
/// not), and a root of `alternatives` alternatives that each name them all in order, so that
/// every rule is counted once more for each rule before it; or chains of ambiguous rules
/// (`r1 ::= r0 "a" | r0 "b"`), each doubling the ways the next may start.
fn start_path_bombs() -> impl Strategy<Value = String> {
    prop_oneof![
        (1usize..7000, 1usize..40, any::<bool>()).prop_map(|(n, alternatives, empty)| {
            let names: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
            let alternative = names.join(" ");
            // Half the limit for the root, the rest for the rules.
            let alternatives = alternatives
                .min(128 * 1024 / (alternative.len() + 3))
                .max(1);
            let mut out = format!("root ::= {}\n", vec![alternative; alternatives].join(" | "));
            let body = if empty { "\"\" | \"x\"" } else { "\"x\"" };
            for name in &names {
                out.push_str(&format!("{name} ::= {body}\n"));
            }
            out.truncate(SamplingParams::MAX_GRAMMAR_BYTES);
            out
        }),
        (1usize..40, 1usize..4).prop_map(|(chain, ways)| {
            let mut out = format!("root ::= r{chain}\nr0 ::= \"a\"\n");
            for i in 1..=chain {
                let alternatives: Vec<String> =
                    (0..=ways).map(|w| format!("r{} \"{w}\"", i - 1)).collect();
                out.push_str(&format!("r{i} ::= {}\n", alternatives.join(" | ")));
            }
            out
        }),
    ]
}

/// Large grammars near the 256 KiB limit: one piece repeated many times (deep nesting, long
/// alternations, many rules, long literals).
fn large() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            "(",
            ")",
            "(\"a\"",
            "\"a\" | ",
            "x{2000}",
            "(x{0,2000})",
            "r ::= \"a\"\n",
            "\"",
            "[",
            "[a-",
            "\\",
            "#",
            "{",
            "a{1,",
            "((",
            "((\"a\"){2000}){2000}",
            "\n",
        ]),
        1usize..(SamplingParams::MAX_GRAMMAR_BYTES / 2 + 1),
        any::<bool>(),
    )
        .prop_map(|(unit, bytes, rooted)| {
            let body = unit.repeat(bytes / unit.len() + 1);
            if rooted {
                format!("root ::= {body}")
            } else {
                body
            }
        })
}

fn accepted() -> u64 {
    ACCEPTED.load(Ordering::Relaxed)
}

#[test]
fn fuzz_grammar_check_arbitrary_text() {
    let text = prop_oneof![
        any::<String>(),
        "\\PC{0,300}",
        prop::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        any::<String>().prop_map(|s| format!("root ::= {s}")),
    ];
    fuzz("grammar_check_arbitrary_text", 1024, text, |g| check(&g));
}

#[test]
fn fuzz_grammar_check_shaped() {
    fuzz("grammar_check_shaped", 1024, shaped(), |g| check(&g));
    println!(
        "fuzz: grammars accepted so far (all targets): {}",
        accepted()
    );
}

#[test]
fn fuzz_grammar_check_generated() {
    fuzz("grammar_check_generated", 256, generated(), |g| check(&g));
    println!(
        "fuzz: grammars accepted so far (all targets): {}",
        accepted()
    );
}

#[test]
fn fuzz_grammar_check_start_paths() {
    fuzz("grammar_check_start_paths", 16, start_path_bombs(), |g| {
        check(&g)
    });
    println!(
        "fuzz: grammars accepted so far (all targets): {}",
        accepted()
    );
}

#[test]
fn fuzz_grammar_check_large() {
    fuzz("grammar_check_large", 32, large(), |g| check(&g));
}
