//! A cost model of the sharded design on machines bigger than the one it was measured on.
//!
//! It is a model, not a measurement: from per-operation costs measured on a small machine it
//! predicts throughput, as a multiple of one shard on one core, for N shards on N dedicated
//! cores, for four ways
//! of serving a command whose lock lives on another core:
//!
//! - per-connection batching (each connection's commands for another shard in one message,
//!   as this server did before thread batching),
//! - per-thread batching (every connection of a thread shares one message per pass),
//! - shard-aware clients (every command is local),
//! - a sharded mutex (every thread applies every command itself, behind a lock whose cache
//!   line moves between cores).
//!
//! With N shards and names routed at random, a fraction (N-1)/N of commands cross a thread.
//! A crossing costs its share of a message round trip (the message, its reply, and the
//! wake-ups of threads that had parked), divided by how many commands share the message.
//! Throughput is N cores divided by the CPU time of one command; the ratio to one shard is
//! what the table prints. Contention, memory bandwidth, the kernel's network stack and the
//! clients are left out: what would prove the model wrong is a run of `loadgen/compare.sh`
//! on a 16-core machine whose ratios fall outside the printed ones by more than the noise.
//!
//! `cargo run --release --example cost_model -- [local_us_p1] [message_us] [ops_per_message_p1]`
//! (defaults: the figures measured on the 2-core machine, see the README).

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<f64>().unwrap_or(f64::NAN));
    let mut next = |default: f64| args.next().filter(|v| v.is_finite()).unwrap_or(default);
    let costs = Costs {
        // Server CPU per command with one shard, pipeline 1 and 32 (µs).
        local_p1: next(6.2),
        // CPU of one cross-thread round trip: message, reply and the wake-ups of threads that
        // had parked (µs); from -shards 2: (8.0 - 6.2) µs per command at half crossing and
        // 3.2 commands per message.
        message: next(11.5),
        // Commands per cross-thread message at pipeline 1 with per-thread batching, with 25
        // connections per thread (measured: 3.2).
        thread_batch_p1: next(3.2),
        local_p32: 0.25,
        // Commands per message at pipeline 32: half of each connection's 32 cross one way.
        conn_batch_p32: 16.0,
        thread_batch_p32: 42.0,
        // A lock's cache line moving to another core (µs); more across sockets.
        bounce: 0.1,
        bounce_far: 0.3,
    };
    println!("| cores = shards | pipeline | per-connection batching | per-thread batching | shard-aware | sharded mutex |");
    println!("|---|---|---|---|---|---|");
    for cores in [1usize, 2, 4, 8, 16, 64] {
        for pipeline in [1, 32] {
            let row = costs.ratios(cores as f64, pipeline);
            println!(
                "| {cores} | {pipeline} | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
                row[0], row[1], row[2], row[3]
            );
        }
    }
}

struct Costs {
    local_p1: f64,
    message: f64,
    thread_batch_p1: f64,
    local_p32: f64,
    conn_batch_p32: f64,
    thread_batch_p32: f64,
    bounce: f64,
    bounce_far: f64,
}

impl Costs {
    /// Throughput relative to one shard: per-connection, per-thread, shard-aware, mutex.
    fn ratios(&self, cores: f64, pipeline: u32) -> [f64; 4] {
        let (local, conn_batch, thread_batch) = if pipeline == 1 {
            // At pipeline 1 a connection has one command in flight: its message carries one.
            (self.local_p1, 1.0, self.thread_batch_p1)
        } else {
            (self.local_p32, self.conn_batch_p32, self.thread_batch_p32)
        };
        let crossing = (cores - 1.0) / cores;
        let per_command = |batch: f64| local + crossing * self.message / batch;
        // Past one socket (assumed above 16 cores), most cache lines come from far away.
        let bounce = if cores > 16.0 {
            self.bounce_far
        } else {
            self.bounce
        };
        let throughput = |cpu: f64| cores / cpu;
        // One shard on one core.
        let one = 1.0 / local;
        [
            throughput(per_command(conn_batch)) / one,
            throughput(per_command(thread_batch)) / one,
            throughput(local) / one,
            throughput(local + crossing * bounce) / one,
        ]
    }
}
