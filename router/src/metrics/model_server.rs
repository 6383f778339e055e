//! The model-server protocol of the Kubernetes Gateway API Inference Extension: the load an
//! endpoint picker (llm-d's scheduler, the Inference Extension's EPP) reads from `/metrics`,
//! under vLLM's names and with vLLM's meanings, so that a gateway needs no configuration of
//! its own for this server. The values are the whole node's (every model, every worker); the
//! `llamapool_*` series beside them say the same per worker.
//!
//! - `vllm:num_requests_running`: requests holding a sequence in a worker's batch;
//! - `vllm:num_requests_waiting`: requests accepted and not yet running (queued in the router
//!   or in a worker);
//! - `vllm:kv_cache_usage_perc`: KV cells held over KV cells in all, 0 to 1;
//! - `vllm:cache_config_info{block_size,num_gpu_blocks}`: always 1. llama.cpp's KV cache has
//!   no blocks; a block here is [`BLOCK_CELLS`] cells, and `num_gpu_blocks` the whole blocks
//!   in every worker's context. Endpoint pickers split prompts into blocks of `block_size`
//!   tokens for their prefix scoring (llm-d raises anything below 64 to 64; the Inference
//!   Extension's own picker takes it as given, and at 1 would hash 4-character pieces).

//!
//! The first three are also written under llamapool's own names (`llamapool_requests_running`,
//! `llamapool_requests_waiting`, `llamapool_kv_cache_usage_ratio`), for an endpoint picker
//! configured with its own mapping (docs/DEPLOYMENT.md) and for dashboards.

use std::fmt::Write as _;

use super::Gauges;

/// KV cells per block in `vllm:cache_config_info` (vLLM's blocks are 16 tokens by default;
/// 64 is what llm-d's scheduler uses at least).
pub const BLOCK_CELLS: u64 = 64;

/// The node's load, summed over the pools of every model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeLoad {
    pub running: u64,
    pub waiting: u64,
    pub kv_cells_used: u64,
    pub kv_cells: u64,
    /// Sequence slots of every worker: requests that can run at once.
    pub slots: u64,
}

impl NodeLoad {
    /// The load of `pools` (one per loaded model; one with one model).
    pub fn of<'a>(pools: impl IntoIterator<Item = &'a Gauges>) -> Self {
        let mut load = Self::default();
        for pool in pools {
            let running: u64 = pool.workers.iter().map(|w| u64::from(w.running)).sum();
            // A worker pushes its counts now and then, the router counts its own at once:
            // running is at most what the router has in flight.
            let running = running.min(pool.processing as u64);
            load.running += running;
            load.waiting += pool.processing as u64 - running;
            load.kv_cells_used += pool
                .workers
                .iter()
                .map(|w| u64::from(w.kv_cells_used))
                .sum::<u64>();
            load.kv_cells += pool.workers.iter().map(|w| w.kv_cells).sum::<u64>();
            load.slots += pool.workers.iter().map(|w| u64::from(w.slots)).sum::<u64>();
        }
        load
    }

    /// Used over total KV cells, 0 to 1 (0 without any cell).
    pub fn kv_cache_usage(&self) -> f64 {
        if self.kv_cells == 0 {
            0.0
        } else {
            (self.kv_cells_used as f64 / self.kv_cells as f64).min(1.0)
        }
    }

    /// The families in the Prometheus text format: vLLM's four, then llamapool's names of
    /// the same three values. Each is one gauge sample: its labels (if any) and value.
    pub fn render(&self) -> String {
        let (running, waiting) = (format!(" {}", self.running), format!(" {}", self.waiting));
        let usage = format!(" {}", self.kv_cache_usage());
        let cache_config = format!(
            "{{block_size=\"{BLOCK_CELLS}\",num_gpu_blocks=\"{}\"}} 1",
            self.kv_cells / BLOCK_CELLS
        );
        let families: [(&str, &str, &str); 7] = [
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches (llamapool: holding a sequence in a worker)",
                &running,
            ),
            (
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed (llamapool: accepted, not yet holding a sequence)",
                &waiting,
            ),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage (llamapool: KV cells held over all KV cells)",
                &usage,
            ),
            (
                "vllm:cache_config_info",
                "Information of the LLMEngine CacheConfig (llamapool: a block is 64 KV cells)",
                &cache_config,
            ),
            (
                "llamapool_requests_running",
                "Requests holding a sequence in a worker, every model and worker",
                &running,
            ),
            (
                "llamapool_requests_waiting",
                "Requests accepted and not yet holding a sequence, every model and worker",
                &waiting,
            ),
            (
                "llamapool_kv_cache_usage_ratio",
                "KV cells held over all KV cells of every worker, 0 to 1",
                &usage,
            ),
        ];
        let mut out = String::new();
        for (name, help, sample) in families {
            let _ = write!(
                out,
                "# HELP {name} {help}.\n# TYPE {name} gauge\n{name}{sample}\n"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::WorkerGauges;

    fn worker(running: u32, used: u32, cells: u64) -> WorkerGauges {
        WorkerGauges {
            running,
            kv_cells_used: used,
            kv_cells: cells,
            ..WorkerGauges::default()
        }
    }

    #[test]
    fn sums_every_pool_and_counts_the_rest_of_in_flight_as_waiting() {
        let a = Gauges {
            processing: 7,
            workers: vec![worker(2, 100, 1000), worker(3, 300, 1000)],
            ..Gauges::default()
        };
        let b = Gauges {
            processing: 1,
            workers: vec![worker(1, 100, 2000)],
            ..Gauges::default()
        };
        let load = NodeLoad::of([&a, &b]);
        assert_eq!(
            load,
            NodeLoad {
                running: 6,
                waiting: 2,
                kv_cells_used: 500,
                kv_cells: 4000,
                slots: 0,
            }
        );
        assert!((load.kv_cache_usage() - 0.125).abs() < 1e-9);
    }

    #[test]
    fn a_stale_running_count_never_makes_waiting_negative() {
        let pool = Gauges {
            processing: 1,
            workers: vec![worker(4, 0, 0)],
            ..Gauges::default()
        };
        let load = NodeLoad::of([&pool]);
        assert_eq!((load.running, load.waiting), (1, 0));
        assert_eq!(load.kv_cache_usage(), 0.0);
    }

    #[test]
    fn renders_vllms_names_as_gauges() {
        let text = NodeLoad {
            running: 2,
            waiting: 5,
            kv_cells_used: 256,
            kv_cells: 1024,
            slots: 8,
        }
        .render();
        for line in [
            "# TYPE vllm:num_requests_running gauge",
            "vllm:num_requests_running 2",
            "vllm:num_requests_waiting 5",
            "vllm:kv_cache_usage_perc 0.25",
            "llamapool_requests_running 2",
            "llamapool_requests_waiting 5",
            "llamapool_kv_cache_usage_ratio 0.25",
            "vllm:cache_config_info{block_size=\"64\",num_gpu_blocks=\"16\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
