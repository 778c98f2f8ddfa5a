use flowwire::prelude::*;

pub struct Plain;

impl Plain {
    #[wire]
    fn step(&mut self) {}
}

fn main() {}
