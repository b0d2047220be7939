fn main() {
    eprintln!("wrenn-agent: the server is not wired yet");
    std::process::exit(64);
}
