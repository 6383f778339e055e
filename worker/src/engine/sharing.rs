//! Prefix sharing between sequences that run at the same time: the policy of which queued
//! requests wait for another sequence to decode the prompt they share.
//!
//! The prompt cache ([`super::seq_ids`]) reuses the cells a *finished* sequence left behind.
//! Requests that start the same way and run together (the `n` choices of one request, or
//! clients with one long system prompt) would still each compute the shared prefix. With a
//! backend that can share cells, the engine gives a new sequence the cells of a running one
//! ([`crate::backend::Backend::share_prefix`]), and this module decides when a queued request
//! is better off waiting a step for those cells to exist than computing them itself.

use llamapool_common::Token;

use super::seq_ids::common_prefix;

/// Shortest shared prefix a queued request waits for: a shorter one costs less to compute
/// again than the step of waiting costs its first token.
pub const MIN_PREFIX_TO_WAIT_FOR: usize = 32;

/// A prompt some sequence is decoding: its tokens and how many of them are in its cells.
#[derive(Debug, Clone, Copy)]
pub struct Prefilling<'a> {
    pub prompt: &'a [Token],
    pub decoded: usize,
}

/// A queued request, as this policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Queued<'a> {
    pub prompt: &'a [Token],
    /// Whether it may reuse cells at all (`cache_prompt`).
    pub may_share: bool,
}

/// How many leading tokens of `prompt` can come from cells holding `cells`: never the whole
/// prompt, since its last token must be decoded for the first sampled one.
pub fn shareable(prompt: &[Token], cells: &[Token]) -> usize {
    common_prefix(prompt, cells).min(prompt.len().saturating_sub(1))
}

/// Which queued requests (indices, queue order, at most `free_ids`) may be admitted this step.
/// A request waits while a sequence still decoding its prompt, or a request admitted ahead of
/// it in this same step, shares at least [`MIN_PREFIX_TO_WAIT_FOR`] tokens with it that are not
/// in cells yet; the requests behind it are not held up.
pub fn admissible<'a>(
    mut prefilling: Vec<Prefilling<'a>>,
    queued: &[Queued<'a>],
    free_ids: usize,
) -> Vec<usize> {
    let mut picked = Vec::new();
    for (index, request) in queued.iter().enumerate() {
        if picked.len() == free_ids {
            break;
        }
        let waits = request.may_share
            && prefilling.iter().any(|p| {
                let shared = shareable(request.prompt, p.prompt);
                shared >= MIN_PREFIX_TO_WAIT_FOR && shared > p.decoded
            });
        if waits {
            continue;
        }
        picked.push(index);
        prefilling.push(Prefilling {
            prompt: request.prompt,
            decoded: 0,
        });
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(prompt: &[Token]) -> Queued<'_> {
        Queued {
            prompt,
            may_share: true,
        }
    }

    #[test]
    fn the_same_long_prompt_waits_for_the_first_and_others_go_on() {
        let long: Vec<Token> = (0..100).collect();
        let other: Vec<Token> = (200..300).collect();
        let picked = admissible(
            Vec::new(),
            &[queued(&long), queued(&long), queued(&other), queued(&long)],
            8,
        );
        assert_eq!(
            picked,
            vec![0, 2],
            "copies wait, an unrelated prompt does not"
        );
    }

    #[test]
    fn a_prefix_already_in_cells_or_too_short_does_not_wait() {
        let long: Vec<Token> = (0..100).collect();
        let decoded = Prefilling {
            prompt: &long,
            decoded: 99,
        };
        assert_eq!(admissible(vec![decoded], &[queued(&long)], 8), vec![0]);
        let short: Vec<Token> = (0..20).collect();
        assert_eq!(
            admissible(Vec::new(), &[queued(&short), queued(&short)], 8),
            vec![0, 1]
        );
    }

    #[test]
    fn waiting_follows_a_running_prefill_and_respects_cache_prompt() {
        let long: Vec<Token> = (0..100).collect();
        let halfway = Prefilling {
            prompt: &long,
            decoded: 50,
        };
        assert!(admissible(vec![halfway], &[queued(&long)], 8).is_empty());
        let no_cache = Queued {
            prompt: &long,
            may_share: false,
        };
        assert_eq!(admissible(vec![halfway], &[no_cache], 8), vec![0]);
    }

    #[test]
    fn free_ids_bound_what_is_picked() {
        let a: Vec<Token> = (0..10).collect();
        let b: Vec<Token> = (10..20).collect();
        assert_eq!(
            admissible(Vec::new(), &[queued(&a), queued(&b)], 1),
            vec![0]
        );
    }

    #[test]
    fn the_last_prompt_token_is_never_shared() {
        assert_eq!(shareable(&[1, 2, 3], &[1, 2, 3, 4]), 2);
        assert_eq!(shareable(&[1, 2, 3], &[1, 9]), 1);
        assert_eq!(shareable(&[], &[1]), 0);
    }
}
