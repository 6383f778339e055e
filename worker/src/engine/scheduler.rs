//! The step scheduler: pure policy, no llama.cpp, no threads.
//!
//! Given what is running and waiting, it decides what one `decode` call carries: one token per
//! decoding sequence (always, so running streams never stall), then prompt chunks for
//! sequences mid-prefill in admission order, then new admissions from the queue head into free
//! sequence ids, all within the `n_batch` token budget (chunked prefill).

/// The engine's state, as far as scheduling is concerned.
#[derive(Debug, Clone, Copy)]
pub struct StepView<'a> {
    /// Sequences that feed their last sampled token this step.
    pub decoding: usize,
    /// Prompt tokens still to prefill, per admitted sequence in admission order.
    pub prefilling: &'a [usize],
    /// Prompt lengths of queued requests, queue head first.
    pub waiting: &'a [usize],
    pub free_ids: usize,
    /// Most tokens one `decode` may carry.
    pub n_batch: usize,
}

/// What one step carries besides the decode tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepPlan {
    /// Prompt tokens to add for each entry of `StepView::prefilling` (same order; may be 0).
    pub prefill: Vec<usize>,
    /// Prompt tokens for each newly admitted request, taken from the queue head in order.
    pub admit: Vec<usize>,
}

impl StepPlan {
    pub fn prompt_tokens(&self) -> usize {
        self.prefill.iter().chain(&self.admit).sum()
    }
}

pub fn plan_step(view: StepView<'_>) -> StepPlan {
    let mut budget = view.n_batch.saturating_sub(view.decoding);
    let prefill = view
        .prefilling
        .iter()
        .map(|&remaining| {
            let chunk = remaining.min(budget);
            budget -= chunk;
            chunk
        })
        .collect();
    let mut admit = Vec::new();
    for &prompt in view.waiting.iter().take(view.free_ids) {
        if budget == 0 {
            break;
        }
        let chunk = prompt.min(budget);
        budget -= chunk;
        admit.push(chunk);
    }
    StepPlan { prefill, admit }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(
        decoding: usize,
        prefilling: &'a [usize],
        waiting: &'a [usize],
        free_ids: usize,
        n_batch: usize,
    ) -> StepView<'a> {
        StepView {
            decoding,
            prefilling,
            waiting,
            free_ids,
            n_batch,
        }
    }

    #[test]
    fn admits_whole_prompts_within_budget() {
        let plan = plan_step(view(0, &[], &[10, 20, 30], 8, 64));
        assert_eq!(plan.admit, vec![10, 20, 30]);
    }

    #[test]
    fn decode_tokens_come_first_and_prompts_are_chunked() {
        let plan = plan_step(view(6, &[], &[100, 5], 8, 64));
        assert_eq!(plan.admit, vec![58]);
        assert_eq!(plan.prompt_tokens() + 6, 64);
    }

    #[test]
    fn running_prefills_continue_before_new_admissions() {
        let plan = plan_step(view(2, &[42, 10], &[7], 1, 32));
        assert_eq!(plan.prefill, vec![30, 0]);
        assert!(plan.admit.is_empty());
        let plan = plan_step(view(2, &[5], &[7, 7], 1, 32));
        assert_eq!(plan.prefill, vec![5]);
        assert_eq!(plan.admit, vec![7]);
    }

    #[test]
    fn free_ids_bound_admissions() {
        let plan = plan_step(view(0, &[], &[1, 1, 1], 2, 64));
        assert_eq!(plan.admit, vec![1, 1]);
        let plan = plan_step(view(4, &[], &[1], 0, 64));
        assert!(plan.admit.is_empty());
    }

    #[test]
    fn a_full_batch_of_decodes_leaves_nothing_for_prompts() {
        let plan = plan_step(view(8, &[3], &[3], 1, 8));
        assert_eq!(plan.prefill, vec![0]);
        assert!(plan.admit.is_empty());
    }
}
