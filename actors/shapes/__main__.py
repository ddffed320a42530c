from actors.shapes.cli import main

main(prog_name="python -m actors.shapes")
