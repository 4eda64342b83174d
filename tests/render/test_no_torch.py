import subprocess
import sys


def test_render_never_imports_torch():
    code = (
        "import sys, numpy as np\n"
        "import attnscope.render as r\n"
        "from attnscope import AttentionVisualizer\n"
        "import matplotlib; matplotlib.use('Agg')\n"
        "AttentionVisualizer().plot_attention_heatmap(np.full((1, 2, 3, 3), 1 / 3), show=False)\n"
        "r.render_archive\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
