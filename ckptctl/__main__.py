from ckptctl.cli.app import run

run()
