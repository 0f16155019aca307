from htcli.cli import app

app(prog_name="htcli")
