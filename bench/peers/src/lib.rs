//! Code shared by the benchmark peers in `src/bin/`: the io_uring driver the `uring-echo`
//! peer runs on (the seed of wharf's next io_uring backend, issue 18).

pub mod uring;
