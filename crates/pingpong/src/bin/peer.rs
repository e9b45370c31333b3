//! The ping-pong peer as a stand-alone program, for the tests and benchmarks
//! of this crate (`shmesh` runs the same code as a hidden subcommand).

use clap::Parser;

fn main() -> std::process::ExitCode {
    shmesh_pingpong::peer::run(&shmesh_pingpong::peer::PeerArgs::parse())
}
