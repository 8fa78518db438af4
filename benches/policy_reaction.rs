//! Part of the issue-7 benchmark suite (scripts/bench); the measurement lands in the next commit.

mod common;

fn main() {}
