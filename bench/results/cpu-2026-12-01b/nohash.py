import sys
import pack.checkpoint as c
class Fake:
    def __init__(self, files): self.files = [str(f) for f in files]; self.files = list(files)
    def result(self): return {"x": "0"}
    def cancel(self): pass
c.FileHasher = Fake
import pack.quantize as q
sys.exit(q.main(sys.argv[1:]))
