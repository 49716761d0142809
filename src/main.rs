fn main() {
    println!("lift");
}
