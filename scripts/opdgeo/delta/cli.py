# PLACEHOLDER written by the pipeline engineer so `opdgeo` imports; replace whole file.
def register(subparsers):
    pass
