"""Sample minflt and CPU of every python process (descendants of a pid) every second."""
import os, sys, time
root = int(sys.argv[1]); dur = float(sys.argv[2])
def kids(pid):
    out=[]
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                for c in f.read().split():
                    out.append(int(c)); out+=kids(int(c))
    except FileNotFoundError: pass
    return out
def stat(pid):
    try:
        s=open(f"/proc/{pid}/stat").read().rsplit(")",1)[1].split()
        cmd=open(f"/proc/{pid}/cmdline").read().replace("\0"," ")[:80]
        return int(s[7]), int(s[11])+int(s[12]), cmd
    except Exception: return None
prev={}
end=time.time()+dur
while time.time()<end:
    time.sleep(1)
    for p in kids(root):
        st=stat(p)
        if not st: continue
        if p in prev:
            df=st[0]-prev[p][0]; dc=st[1]-prev[p][1]
            if dc>20: print(f"{p} faults/s {df:7d} cpu% {dc:4d} {st[2]}", flush=True)
        prev[p]=st
    print("--", flush=True)
