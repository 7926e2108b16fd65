# Figures, paper tables, findings and the report's captions: rendered from tidy tables only.


def figure_targets():
    return []
