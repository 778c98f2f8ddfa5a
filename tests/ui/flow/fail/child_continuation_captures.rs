// A child's continuation, like a drive's, must not capture: it is rederived from the wire
// after a restart.
use flowwire::prelude::*;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Part {
    rows: u64,
}

#[flow]
pub struct Load {
    #[link]
    state: Part,
}

#[flow]
impl Load {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        Command::finish()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Fill {
    rows: u64,
}

#[flow]
pub struct Backfill {
    #[link]
    state: Fill,
}

#[flow]
impl Backfill {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let scale = self.state.rows + 1;
        Command::child::<Load>("p-1", Part::default()).then(move |f, child| {
            f.state.rows = child?.state.rows * scale;
            Ok(())
        })
    }
}

fn main() {}
