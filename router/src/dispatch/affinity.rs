//! Prefix affinity: which worker most likely holds a prompt's prefix in its prompt cache.
//!
//! A worker keeps the KV cells of its finished sequences and reuses the longest common prefix
//! for a new request (`worker/src/engine/seq_ids.rs`), but only its own: a multi-turn chat
//! whose next turn lands on another worker evaluates the whole conversation again. The router
//! has no tokens for text and chat prompts, so it keys prompts by what it does have: the
//! prompt's bytes (a chat's roles and contents in order, a text, or token ids), cut into
//! fixed-size blocks, each block's hash chained to the one before it. Two prompts share a
//! leading run of equal hashes exactly when they share that many leading blocks.
//!
//! Per worker, [`PrefixTable`] mirrors the worker's cache: at most one entry per sequence slot,
//! and a new request replaces the entry it shares the longest prefix with (the worker reuses
//! that sequence), else the oldest. The table is a guess — the worker may have evicted
//! differently, or restarted — and a wrong guess costs only a cache miss.
//!
//! The policy that weighs a match against load is `Inner::best_worker` (`pool.rs`); this module
//! is the mechanism.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use llamapool_common::protocol::Prompt;
use llamapool_common::ChatMessage;

/// Bytes per block: about 60 tokens of English text. Smaller blocks match more finely and
/// cost more hashes; a conversation's turns differ by far more than one block.
const BLOCK_BYTES: usize = 256;

/// A prompt's chained block hashes, first block first.
pub type PrefixChain = Arc<[u64]>;

/// The chained block hashes of a prompt. The chain starts from the kind of prompt, so that a
/// text and a chat with the same bytes never match.
pub fn prefix_chain(prompt: &Prompt) -> PrefixChain {
    match prompt {
        Prompt::Text(text) => chain(b'T', text.as_bytes()),
        Prompt::Tokens(tokens) => {
            let raw: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
            chain(b'I', &raw)
        }
        Prompt::Chat(chat) => chain(b'C', &chat_bytes(&chat.messages)),
    }
}

/// A conversation's bytes: each message's role and content, with separators no text contains
/// so that moving bytes between fields changes the stream.
fn chat_bytes(messages: &[ChatMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for message in messages {
        let json = serde_json::to_vec(message).unwrap_or_default();
        out.extend_from_slice(&json);
        out.push(0);
    }
    out
}

/// Full blocks only: a prompt shorter than a block has no chain and is routed by load alone,
/// as reusing a few cached tokens is worth less than balancing the workers.
fn chain(kind: u8, bytes: &[u8]) -> PrefixChain {
    let mut previous = u64::from(kind);
    bytes
        .chunks_exact(BLOCK_BYTES)
        .map(|block| {
            let mut hasher = DefaultHasher::new();
            previous.hash(&mut hasher);
            block.hash(&mut hasher);
            previous = hasher.finish();
            previous
        })
        .collect()
}

/// How many leading blocks two chains share.
fn shared_blocks(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// One worker's guessed prompt cache: the chains of its most recent requests, at most one per
/// sequence slot, oldest first.
#[derive(Debug, Default)]
pub struct PrefixTable {
    entries: Mutex<VecDeque<PrefixChain>>,
}

impl PrefixTable {
    /// The most leading blocks `chain` shares with any cached entry, and how many prompts the
    /// table holds.
    pub fn weigh(&self, chain: &[u64]) -> (usize, usize) {
        let entries = self.lock();
        let longest = entries
            .iter()
            .map(|entry| shared_blocks(entry, chain))
            .max()
            .unwrap_or(0);
        (longest, entries.len())
    }

    /// A request with `chain` was sent to this worker, whose cache holds `slots` sequences:
    /// as the worker does, it takes over the entry it shares most with, else the oldest.
    pub fn record(&self, chain: PrefixChain, slots: usize) {
        if chain.is_empty() || slots == 0 {
            return;
        }
        let mut entries = self.lock();
        let best = entries
            .iter()
            .enumerate()
            .map(|(at, entry)| (shared_blocks(entry, &chain), at))
            .max()
            .filter(|&(shared, _)| shared > 0);
        if let Some((_, at)) = best {
            entries.remove(at);
        }
        while entries.len() >= slots {
            entries.pop_front();
        }
        entries.push_back(chain);
    }

    /// The worker (re)started with an empty cache.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<PrefixChain>> {
        // The table is a cache of guesses: a panic while holding it leaves nothing to repair.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use llamapool_common::protocol::{ChatEnding, ChatPrompt};

    use super::*;

    fn chat(turns: &[(&str, &str)]) -> Prompt {
        Prompt::Chat(ChatPrompt {
            messages: turns
                .iter()
                .map(|(role, content)| ChatMessage {
                    role: (*role).into(),
                    content: (*content).into(),
                    ..ChatMessage::default()
                })
                .collect(),
            ending: ChatEnding::OpenAssistant,
            ..ChatPrompt::default()
        })
    }

    fn long(seed: &str) -> String {
        format!("{seed} ").repeat(200)
    }

    #[test]
    fn a_next_turn_shares_the_whole_previous_conversation() {
        let system = long("You are a helpful assistant.");
        let first = prefix_chain(&chat(&[("system", &system), ("user", "Hi")]));
        let second = prefix_chain(&chat(&[
            ("system", &system),
            ("user", "Hi"),
            ("assistant", "Hello! How can I help?"),
            ("user", "Tell me a story."),
        ]));
        let full_blocks = system.len() / BLOCK_BYTES;
        assert!(shared_blocks(&first, &second) >= full_blocks);
        assert!(second.len() >= first.len());
    }

    #[test]
    fn a_prompt_shorter_than_a_block_has_no_chain() {
        assert!(prefix_chain(&chat(&[("user", "Name a colour.")])).is_empty());
        assert_eq!(
            prefix_chain(&Prompt::Text(long("x"))).len(),
            400 / BLOCK_BYTES
        );
    }

    #[test]
    fn different_system_prompts_share_nothing() {
        let a = prefix_chain(&chat(&[("system", &long("Assistant A.")), ("user", "Hi")]));
        let b = prefix_chain(&chat(&[("system", &long("Assistant B.")), ("user", "Hi")]));
        assert_eq!(shared_blocks(&a, &b), 0);
    }

    #[test]
    fn texts_and_chats_never_match() {
        let text = long("same bytes");
        let a = prefix_chain(&Prompt::Text(text.clone()));
        let b = prefix_chain(&chat(&[("user", &text)]));
        assert_eq!(shared_blocks(&a, &b), 0);
    }

    fn longest(table: &PrefixTable, chain: &[u64]) -> usize {
        table.weigh(chain).0
    }

    #[test]
    fn the_table_replaces_the_entry_a_turn_continues_and_keeps_one_per_slot() {
        let table = PrefixTable::default();
        let conversation =
            |n: u64, turns: u64| -> PrefixChain { (0..turns).map(|t| n * 1000 + t + 1).collect() };
        table.record(conversation(1, 2), 2);
        table.record(conversation(2, 2), 2);
        // Turn 2 of conversation 1 takes over its own entry: conversation 2 stays.
        table.record(conversation(1, 4), 2);
        assert_eq!(longest(&table, &conversation(1, 5)), 4);
        assert_eq!(longest(&table, &conversation(2, 3)), 2);
        // A third conversation evicts the oldest entry (conversation 2).
        table.record(conversation(3, 1), 2);
        assert_eq!(longest(&table, &conversation(2, 3)), 0);
        assert_eq!(longest(&table, &conversation(1, 5)), 4);
        table.clear();
        assert_eq!(longest(&table, &conversation(1, 5)), 0);
    }
}
