"""The stylesheet, elements and script of the interactive viewer (embedded verbatim).

One viewer per report page (:mod:`attnscope.render.report`), or several on one notebook
page (:mod:`attnscope.render.notebook`): every element id starts with the viewer's prefix
(``""`` in the report; ``attnscope-<random>-`` in a notebook, where the stylesheet is scoped
to the viewer's root, :func:`scoped_css`, and the URL fragment is left alone). The script,
:data:`JS_FUNCTION` called by :func:`script`, keeps its state in its own closure (no
globals) and reads one JSON document (``<script type="application/json"
id="PREFIXattnscope-data">``, built by ``report._viewer_data``) and draws everything
client-side on canvases:

* the attention map of the chosen array, sample and head (or the mean of the heads),
  coloured through the embedded colormap LUT from 0 to the largest weight of the allowed
  cells (rows with a single allowed key left out), masked cells (causal: a key past the
  query, ``data.causal``) in the mask colour ``D.mask`` with a legend entry, segment
  boundaries as white lines, a label
  per token up to 40 tokens and segment names beyond; each sample with its own tokens
  (``D.tokens[side][sample]``: labels and segments of its real tokens, and their stored
  positions ``pos``, null when none is padding), its map holding only those tokens;
* hovering a cell shows its query token, key token (label and stored position) and weight
  (``#hover``);
* clicking a cell or a query label shows that query's row as bars (``#row``), BertViz's
  head view for any modality;
* the entropy (layer x head), modality-to-modality mass and top pairs of the analysis
  tables for the current choice (hidden when ``data.tables`` is false: no tables given);
* overlays (``D.images``: the image groups of each array's key side): the chosen query's
  row (a clicked query, or the mean row of the query segment chosen in ``#sel-qseg``) on
  each image group's patch grid, the numbers of ``render.overlay.prepare_overlay``,
  through the colormap from 0 to the grid's largest mass; over the frame stored with the
  sample (``D.frames``, raw RGB) when there is one, with alpha (smoothed from 8 patches a
  side, flat patches below, as ``render.overlay``'s ``upsampling="auto"``). Each
  grid canvas carries its values (``data-grid``) and brightest patch (``data-argmax``);
* the episode timeline (``D.timeline``, from ``timeline.parquet``): mass on each key
  modality vs step, for the chosen episode and the current array's layer and head.

Every label reaches the page through ``textContent`` or ``fillText``, never as HTML. The view
is mirrored in the URL fragment (``#array=...&sample=0&head=avg&q=3&cell=3,5``), so a view
can be linked; ``cell`` shows that cell as if hovered, ``click=i,j`` clicks it, ``qseg``
and ``ep`` choose the overlay's query segment and the timeline's episode. ``q`` and
``cell`` count the cells of the map shown (a sample's real tokens), not stored positions.
"""

import json
import re

#: rules of the whole report page
PAGE_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222}
header{background:#1f2937;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
main{padding:8px 24px 40px;max-width:1400px}h2{border-bottom:1px solid #ddd;padding-bottom:4px}
pre{background:#f7f7f7;padding:8px;overflow:auto}
"""
#: rules of the viewer's elements (scoped to one viewer's root in a notebook)
VIEW_CSS = """
table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f3f4f6}td.l,th.l{text-align:left}td.cur{outline:2px solid #e11}
select{font-size:14px;margin-right:12px}
.muted{color:#666}.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.hover{min-height:1.5em;font-family:ui-monospace,monospace;white-space:pre}
canvas{border:1px solid #eee}.ov{font-size:12px;text-align:center}
"""
CSS = PAGE_CSS + VIEW_CSS


def scoped_css(root_id: str) -> str:
    """:data:`VIEW_CSS` with every selector under ``#root_id``: several viewers on one
    notebook page, none styling the page around it."""
    rules = []
    for sels, body in re.findall(r"([^{}]+)\{([^{}]*)\}", VIEW_CSS):
        scoped = ",".join(f"#{root_id} {sel.strip()}" for sel in sels.split(","))
        rules.append(f"{scoped}{{{body}}}")
    return (f"#{root_id}{{font:13px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;"
            f"color:#222;background:#fff;padding:6px 8px}}#{root_id} h3{{font-size:14px;"
            f"margin:8px 0 4px}}" + "".join(rules))


def script(prefix: str, use_hash: bool) -> str:
    """The viewer's ``<script>`` element for the elements whose ids start with ``prefix``;
    ``use_hash``: mirror the view in the page's URL fragment (the report, one per page)."""
    return f"<script>{JS_FUNCTION}({json.dumps(prefix)},{str(use_hash).lower()});</script>"


def markup(prefix: str, note: str) -> str:
    """The viewer's elements (ids prefixed with ``prefix``); ``note`` is HTML, already
    escaped, saying what is embedded and how to choose more."""
    p = prefix
    return (
        f"<p><label>array <select id='{p}sel-array'></select></label>"
        f"<label>sample <select id='{p}sel-sample'></select></label>"
        f"<label>head <select id='{p}sel-head'></select></label></p>"
        f"<p class='muted'>{note} Hover a cell for its tokens and "
        "weight; click a query (a row) for its attention as bars. Colours run from 0 to the "
        "largest weight of the map shown, rows with a single allowed key (a causal map's "
        "first row) left out; grey cells are masked (not attended).</p>"
        f"<div id='{p}hover' class='hover muted'></div>"
        f"<div class='row'><canvas id='{p}map' width='10' height='10'></canvas>"
        f"<div><h3 id='{p}row-title'></h3><canvas id='{p}row' width='10' height='10'></canvas>"
        "</div></div>"
        f"<div class='row' id='{p}tables'><div><h3>Normalised entropy (layer x head)</h3>"
        "<p class='muted'>Mean row entropy / log of the keys a row may attend to "
        "(1 = uniform, 0 = one key); mean over samples; colours on a fixed 0-1 scale."
        f"</p><div id='{p}entropy'></div></div>"
        f"<div id='{p}mass-box'><h3>Modality-to-modality mass</h3>"
        "<p class='muted'>Rows: query segment; "
        "columns: key segment; mean over samples. Each row sums to 1.</p>"
        f"<div id='{p}mass'></div></div>"
        "<div><h3>Top pairs</h3><p class='muted'>Forced cells (a query's only allowed "
        f"key) left out.</p><div id='{p}pairs'></div></div></div>"
        f"<div class='row'><div id='{p}overlay-box'><h3>Where the query looks on the images</h3>"
        f"<p class='muted'><label>query segment <select id='{p}sel-qseg'></select></label> "
        "Attention mass of the chosen query (a clicked row, or a segment's mean row) on each "
        "image group, on its patch grid (absolute mass, over the frame stored with the "
        f"sample when there is one).</p><div id='{p}overlay' class='row'></div></div>"
        f"<div id='{p}timeline-box'><h3>Episode timeline</h3><p class='muted'>"
        f"<label>episode <select id='{p}sel-episode'></select></label> Attention mass of the "
        "timeline's query group on each key modality vs step (this array's layer, head).</p>"
        f"<canvas id='{p}timeline' width='10' height='10'></canvas></div></div>"
    )


JS_FUNCTION = r"""
(function(P,useHash){
'use strict';
var $=function(id){return document.getElementById(P+id);};
var D=JSON.parse($('attnscope-data').textContent),R=P?$('root'):document.body;
var lut=(function(){var b=atob(D.lut),a=new Uint8Array(b.length);
  for(var i=0;i<b.length;i++)a[i]=b.charCodeAt(i);return a;})();
var st={array:D.initial.array,sample:D.initial.sample,head:D.initial.head===undefined||
  D.initial.head===null?'avg':String(D.initial.head),q:null,qseg:'',ep:null};
var cache={}, view=null;
function arrayOf(name){for(var i=0;i<D.arrays.length;
  i++)if(D.arrays[i].name===name)return D.arrays[i];return D.arrays[0];}
function f16(u){var e=(u>>10)&31,f=u&1023,s=(u&32768)?-1:1;
  if(e===0)return s*f*5.960464477539063e-8; if(e===31)return f?NaN:s*Infinity;
  return s*Math.pow(2,e-15)*(1+f/1024);}
function maps(a0,sample){ // (H, t, s) float16 -> list of Float64Array per head
  var key=a0.name+'|'+sample; if(cache[key])return cache[key];
  var d=a0.data[String(sample)],b=atob(d.b64),n=d.t*d.s,out=[];
  for(var h=0;h<a0.heads.length;h++){var m=new Float64Array(n);
    for(var i=0;i<n;i++){var o=2*(h*n+i);m[i]=f16(b.charCodeAt(o)|(b.charCodeAt(o+1)<<8));}
    out.push(m);}
  return (cache[key]=out);}
function viewOf(a0,sample){ // one sample of an array: its sizes and its own tokens
  var d=a0.data[String(sample)],k=String(sample);
  return {name:a0.name,stack:a0.stack,layer:a0.layer,kind:a0.kind,heads:a0.heads,T:d.T,S:d.S,
    t:d.t,s:d.s,fr:d.fr,fc:d.fc,causal:!!d.causal,
    sides:{rows:D.tokens[a0.rows][k],cols:D.tokens[a0.cols][k]}};}
function maskOf(a){ // 1 = not attended (causal: key position past the query's); null: none
  if(!a.causal)return null;var rs=side(a,'rows'),ks=side(a,'cols'),mk=new Uint8Array(a.t*a.s);
  for(var i=0;i<a.t;i++){var ql=posOf(rs,Math.min((i+1)*a.fr,a.T)-1);
    for(var j=0;j<a.s;j++)mk[i*a.s+j]=posOf(ks,j*a.fc)>ql?1:0;}
  return mk;}
function scaleMax(a,m,mk){ // largest weight of allowed cells, rows with one allowed key left out
  var mx=0,any=0;for(var i=0;i<a.t;i++){var n=0,rm=0;for(var j=0;j<a.s;j++){var k=i*a.s+j;
    if(mk&&mk[k])continue;n++;if(m[k]>rm)rm=m[k];}
    if(n>1){any=1;if(rm>mx)mx=rm;}}
  if(!any)for(var k2=0;k2<m.length;k2++)if((!mk||!mk[k2])&&m[k2]>mx)mx=m[k2];
  return mx||1;}
function current(){var a0=arrayOf(st.array),a=viewOf(a0,st.sample),ms=maps(a0,st.sample),m;
  if(st.head==='avg'){m=new Float64Array(a.t*a.s);
    for(var h=0;h<ms.length;h++)for(var i=0;i<m.length;i++)m[i]+=ms[h][i];
    for(var j=0;j<m.length;j++)m[j]/=ms.length;}
  else m=ms[a.heads.indexOf(Number(st.head))];
  return {a:a,m:m};}
function side(a,which){return a.sides[which];}
function posOf(sd,k){return sd.pos?sd.pos[k]:k;} // stored position of the k-th real token
function span(a,which,i){var f=which==='rows'?a.fr:a.fc,n=which==='rows'?a.T:a.S;
  return [i*f,Math.min((i+1)*f,n)-1];}
function tokenText(a,which,i){var sd=side(a,which),r=span(a,which,i),lab=function(k){
  return sd.labels[k]!==undefined?sd.labels[k]:String(k);};
  if(r[0]===r[1])return '"'+lab(r[0])+'" (#'+posOf(sd,r[0])+')';
  return '"'+lab(r[0])+'" .. "'+lab(r[1])+'" (#'+posOf(sd,r[0])+'-'+posOf(sd,r[1])+')';
    }
function hash32(px){var h=2166136261;for(var i=0;i<px.length;i++){h^=px[i];h=Math.imul(h,
  16777619);}return (h>>>0).toString(16);}
function fill(sel,items,value){sel.textContent='';items.forEach(function(it){
  var o=document.createElement('option');
  o.value=it[0];o.textContent=it[1];sel.appendChild(o);});sel.value=String(value);}
function segLines(ctx,a,which,x0,y0,cs,len){var sd=side(a,which),f=which==='rows'?a.fr:a.fc;
  ctx.strokeStyle='rgba(255,255,255,0.9)';ctx.lineWidth=1;
  sd.segments.slice(1).forEach(function(g){var p=Math.round(g[1]/f*cs)+0.5;ctx.beginPath();
    if(which==='rows'){ctx.moveTo(x0,y0+p);ctx.lineTo(x0+len,y0+p);}else{ctx.moveTo(x0+p,y0);
      ctx.lineTo(x0+p,y0+len);}
    ctx.stroke();});}
function axisLabels(ctx,a,which,n,cs,x0,y0,top){ // every k-th token's label (at most 40),
  // and the segment names beside them (left of the rows; above the columns, at top)
  var sd=side(a,which),f=which==='rows'?a.fr:a.fc,k=Math.max(1,Math.ceil(n/40)),items=[];
  if(sd.labels.length)for(var i=0;i<n;i+=k)items.push([sd.labels[Math.min(i*f,
    sd.labels.length-1)],i+0.5]);
  ctx.fillStyle='#222';ctx.font=(n<=20?'11px':'10px')+' sans-serif';
  items.forEach(function(it){var t=String(it[0]); // long labels cut in the middle
    if(t.length>24)t=t.slice(0,11)+'\u2026'+t.slice(t.length-12);
    if(which==='rows'){ctx.textAlign='right';ctx.textBaseline='middle';ctx.fillText(t,x0-4,
      y0+it[1]*cs);}
    else{ctx.save();ctx.translate(x0+it[1]*cs,y0+4);ctx.rotate(-Math.PI/2);
      ctx.textAlign='right';
      ctx.textBaseline='middle';ctx.fillText(t,0,0);ctx.restore();}});
  if(sd.segments.length<2&&items.length)return;
  ctx.font='italic 11px sans-serif';ctx.fillStyle='#555';
  sd.segments.forEach(function(g){var c=(g[1]+g[2])/2/f*cs,t=String(g[0]);
    if(t.length>30)t=t.slice(0,29)+'\u2026';
    if(which==='rows'){ctx.save();ctx.translate(x0-176,y0+c);ctx.rotate(-Math.PI/2);
      ctx.textAlign='center';ctx.textBaseline='top';ctx.fillText(t,0,0);ctx.restore();}
    else if(top!==undefined){ctx.textAlign='center';ctx.textBaseline='bottom';
      ctx.fillText(t,x0+c,top-4);}});}
function draw(){var c=current(),a=c.a,m=c.m,cv=$('map'),ctx=cv.getContext('2d');
  var cs=Math.max(2,Math.floor(Math.min(560/a.t,560/a.s))),L=190,T=44,B=150;
  cv.width=L+a.s*cs+100;cv.height=T+a.t*cs+B;ctx.fillStyle='#fff';ctx.fillRect(0,0,cv.width,
    cv.height);
  var mk=maskOf(a),vmax=scaleMax(a,m,mk);
  var off=document.createElement('canvas');off.width=a.s;off.height=a.t;
    var oc=off.getContext('2d'),img=oc.createImageData(a.s,a.t);
  for(var k=0;k<m.length;k++){var q=Math.max(0,Math.min(255,Math.round(m[k]/vmax*255)))*3;
    var rgb=mk&&mk[k]?D.mask:[lut[q],lut[q+1],lut[q+2]];
    img.data[4*k]=rgb[0];img.data[4*k+1]=rgb[1];img.data[4*k+2]=rgb[2];img.data[4*k+3]=255;}
  oc.putImageData(img,0,0);ctx.imageSmoothingEnabled=false;ctx.drawImage(off,L,T,a.s*cs,a.t*cs);
  segLines(ctx,a,'rows',L,T,cs,a.s*cs);segLines(ctx,a,'cols',L,T,cs,a.t*cs);
  axisLabels(ctx,a,'rows',a.t,cs,L,T);axisLabels(ctx,a,'cols',a.s,cs,L,T+a.t*cs,T);
  var bx=L+a.s*cs+20,bh=a.t*cs;for(var y=0;y<bh;y++){var v=Math.round((1-y/bh)*255)*3;
    ctx.fillStyle='rgb('+lut[v]+','+lut[v+1]+','+lut[v+2]+')';ctx.fillRect(bx,T+y,14,1);}
  ctx.fillStyle='#222';ctx.textAlign='left';ctx.textBaseline='middle';
    ctx.font='11px sans-serif';
  ctx.fillText(vmax.toPrecision(3),bx+18,T+4);ctx.fillText('0',bx+18,T+bh-4);
  if(mk&&mk.indexOf(1)>=0){ctx.fillStyle='rgb('+D.mask.join(',')+')';
    ctx.fillRect(bx,T+bh+10,14,14);ctx.fillStyle='#222';ctx.fillText('masked',bx+18,T+bh+17);}
  ctx.textBaseline='top';ctx.font='13px sans-serif';
  var who=st.head==='avg'?'mean of heads':'head '+st.head;
  ctx.fillText(a.name+' \u00b7 sample '+st.sample+' \u00b7 '+who,
    L,6);
  view={a:a,m:m,cs:cs,L:L,T:T,mk:mk,vmax:vmax};R.dataset.drawn=hash32(img.data);
  cv.dataset.masked=String(mk?mk.reduce(function(x,y){return x+y;},0):0);
  cv.dataset.vmax=String(vmax);cv.dataset.geom=[L,T,cs].join(',');
  drawRow();tables();drawOverlay();drawTimeline();}
function bytesOf(b64){var b=atob(b64),a=new Uint8Array(b.length);
  for(var i=0;i<b.length;i++)a[i]=b.charCodeAt(i);return a;}
function overlayRows(a){ // the map rows averaged for the overlay, or a reason why none
  if(a.fr!==1||a.fc!==1)return 'this map is block-reduced: no overlay';
  if(st.qseg){var g=side(a,'rows').segments.filter(function(x){return x[0]===st.qseg;})[0];
    if(!g)return 'no query segment '+st.qseg;var r=[];for(var i=g[1];i<g[2];i++)r.push(i);
    return {rows:r,name:'segment '+g[0]};}
  if(st.q!==null&&st.q<a.t)return {rows:[st.q],name:'query '+tokenText(a,'rows',st.q)};
  return 'Click a query (a row of the map) or choose a query segment.';}
function drawOverlay(){var box=$('overlay'),a=view.a,groups=D.images[a.name];
  box.textContent='';$('overlay-box').style.display=Object.keys(D.images).length?'':'none';
  fill($('sel-qseg'),[['','(the clicked query)']].concat(side(a,'rows').segments.map(
    function(g){return [g[0],g[0]];})),st.qseg);
  if(!groups){box.textContent='(the keys of this array have no image group)';return;}
  var sel=overlayRows(a);if(typeof sel==='string'){box.textContent=sel;return;}
  var sd=side(a,'cols'),n=a.s,row=new Float64Array(n),all=0;
  sel.rows.forEach(function(i){for(var j=0;j<n;j++)row[j]+=view.m[i*n+j]/sel.rows.length;});
  for(var j=0;j<n;j++)all+=row[j];
  groups.forEach(function(g){var R=g[3],C=g[4],grid=[],tot=0,mx=0,arg=-1,k;
    for(k=0;k<R*C;k++)grid.push(NaN);
    for(j=0;j<n;j++){var p=posOf(sd,j);if(p>=g[1]&&p<g[2])grid[p-g[1]]=row[j];}
    grid.forEach(function(v,i){if(v===v){tot+=v;if(v>mx){mx=v;arg=i;}}});
    var P=Math.max(12,Math.floor(192/Math.max(R,C))),cv=document.createElement('canvas'),
      ctx=cv.getContext('2d'),fr=g[5]&&D.frames[g[5]]?D.frames[g[5]][String(st.sample)]:null;
    cv.width=C*P;cv.height=R*P;cv.className='overlay';cv.dataset.image=g[0];
    if(fr){var px=bytesOf(fr.b64),fo=document.createElement('canvas');fo.width=fr.w;
      fo.height=fr.h;var fc=fo.getContext('2d'),fi=fc.createImageData(fr.w,fr.h);
      for(k=0;k<fr.w*fr.h;k++){fi.data[4*k]=px[3*k];fi.data[4*k+1]=px[3*k+1];
        fi.data[4*k+2]=px[3*k+2];fi.data[4*k+3]=255;}
      fc.putImageData(fi,0,0);ctx.imageSmoothingEnabled=true;ctx.drawImage(fo,0,0,cv.width,
        cv.height);}
    var ho=document.createElement('canvas');ho.width=C;ho.height=R;
    var hc=ho.getContext('2d'),hi=hc.createImageData(C,R);
    for(k=0;k<R*C;k++){var v=grid[k],q=Math.max(0,Math.min(255,Math.round(v/(mx||1)*255)))*3;
      hi.data[4*k]=lut[q];hi.data[4*k+1]=lut[q+1];hi.data[4*k+2]=lut[q+2];
      hi.data[4*k+3]=v===v?(fr?140:255):0;}
    // smoothed over a frame only from 8 patches a side (as render.overlay's "auto")
    hc.putImageData(hi,0,0);ctx.imageSmoothingEnabled=!!fr&&Math.min(R,C)>=8;
    ctx.drawImage(ho,0,0,cv.width,
      cv.height);
    cv.dataset.grid=JSON.stringify(grid.map(function(v){return v===v?+v.toFixed(5):null;}));
    cv.dataset.argmax=arg<0?'':Math.floor(arg/C)+','+(arg%C);cv.dataset.frame=fr?'1':'0';
    var d=document.createElement('div'),cap=document.createElement('div');d.className='ov';
    cap.textContent=g[0]+' \u2190 '+sel.name+': '+(100*tot/(all||1)).toFixed(1)+
      '% of the mass (max '+mx.toPrecision(3)+')';
    d.appendChild(cv);d.appendChild(cap);box.appendChild(d);});}
var PAL=['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#7f7f7f',
  '#bcbd22','#17becf'];
function drawTimeline(){var T=D.timeline,cv=$('timeline');
  if(!T){$('timeline-box').style.display='none';return;}
  var a=view.a,key=T.series[a.stack+'|'+a.kind]?a.stack+'|'+a.kind:Object.keys(T.series)[0],
    S=T.series[key],eps=Object.keys(S);
  if(eps.indexOf(String(st.ep))<0)st.ep=eps[0];
  fill($('sel-episode'),eps.map(function(e){return [e,'episode '+e];}),st.ep);
  var byL=S[st.ep],layer=byL[String(a.layer)]?String(a.layer):Object.keys(byL)[0],
    hk=st.head==='avg'?'-1':String(st.head),lines=byL[layer][hk]||byL[layer]['-1']||[];
  var L=44,Tp=26,W=380,H=200,B=34;cv.width=L+W+150;cv.height=Tp+H+B;
  var ctx=cv.getContext('2d'),lo=Infinity,hi=-Infinity;
  ctx.fillStyle='#fff';ctx.fillRect(0,0,cv.width,cv.height);
  lines.forEach(function(l){l[1].forEach(function(x){lo=Math.min(lo,x);hi=Math.max(hi,x);});});
  if(hi<=lo)hi=lo+1;var X=function(x){return L+(x-lo)/(hi-lo)*W;},
    Y=function(y){return Tp+(1-y)*H;};
  ctx.strokeStyle='#999';ctx.strokeRect(L+0.5,Tp+0.5,W,H);ctx.fillStyle='#222';
  ctx.font='11px sans-serif';ctx.textAlign='right';ctx.textBaseline='middle';
  [0,0.5,1].forEach(function(y){ctx.fillText(String(y),L-4,Y(y));});
  ctx.textAlign='center';ctx.textBaseline='top';ctx.fillText(String(lo),X(lo),Tp+H+4);
  ctx.fillText(String(hi),X(hi),Tp+H+4);ctx.fillText('step',L+W/2,Tp+H+18);
  lines.forEach(function(l,i){ctx.strokeStyle=ctx.fillStyle=PAL[i%PAL.length];ctx.lineWidth=2;
    ctx.beginPath();l[1].forEach(function(x,k){var f=k?'lineTo':'moveTo';ctx[f](X(x),
      Y(l[2][k]));});ctx.stroke();ctx.textAlign='left';ctx.textBaseline='middle';
    var t=String(l[0]);if(t.length>20)t=t.slice(0,19)+'\u2026';ctx.fillText(t,L+W+8,Tp+8+14*i);});
  ctx.fillStyle='#222';ctx.textAlign='left';ctx.textBaseline='top';ctx.font='12px sans-serif';
  ctx.fillText(T.query+' \u2192 key modalities \u00b7 '+key.replace('|',' ')+' layer '+layer+
    ' \u00b7 '+(hk==='-1'?'mean of heads':'head '+hk),L,6);
  cv.dataset.lines=String(lines.length);cv.dataset.episode=String(st.ep);cv.dataset.layer=layer;}
function scaleOf(cv){ // canvas pixels per CSS pixel (a notebook may shrink a wide canvas)
  return cv.clientWidth?cv.width/cv.clientWidth:1;}
function cellAt(ev){if(!view)return null;var cv=$('map'),r=cv.getBoundingClientRect(),
  k=scaleOf(cv),x=(ev.clientX-r.left-cv.clientLeft)*k-view.L,
    y=(ev.clientY-r.top-cv.clientTop)*k-view.T,j=Math.floor(x/view.cs),i=Math.floor(y/view.cs);
  return {i:i,j:j,inMap:i>=0&&j>=0&&i<view.a.t&&j<view.a.s,label:x<0&&i>=0&&i<view.a.t};}
function hover(ev){var c=cellAt(ev),h=$('hover');if(!c||!c.inMap){return;}
  var w=view.m[c.i*view.a.s+c.j];h.dataset.weight=String(w);h.dataset.cell=c.i+','+c.j;
  h.textContent='query '+tokenText(view.a,'rows',c.i)+'  \u2192  key '+tokenText(view.a,'cols',
    c.j)+
    '  weight '+w.toPrecision(4)+
    (view.mk&&view.mk[c.i*view.a.s+c.j]?'  (masked: not attended)':'');}
function drawRow(){var cv=$('row'),ctx=cv.getContext('2d'),a=view.a;
  if(st.q===null||st.q>=a.t){cv.width=10;cv.height=10;cv.style.display='none';
    $('row-title').textContent='Click a query (a row of the map) to see its attention as bars.';
    return;}
  cv.style.display='';
  var n=a.s,bw=Math.max(3,Math.floor(560/n)),L=50,T=10,H=180,B=150;cv.width=L+n*bw+20;
    cv.height=T+H+B;
  ctx.fillStyle='#fff';ctx.fillRect(0,0,cv.width,cv.height);var row=view.m.subarray(st.q*n,
    (st.q+1)*n),mx=0;
  for(var j=0;j<n;j++)if(row[j]>mx)mx=row[j];mx=mx||1;ctx.fillStyle='#1f77b4';
  for(j=0;j<n;j++){var hgt=row[j]/mx*H;ctx.fillRect(L+j*bw+1,T+H-hgt,bw-2,hgt);}
  ctx.strokeStyle='#999';ctx.beginPath();ctx.moveTo(L,T+H+0.5);ctx.lineTo(L+n*bw,T+H+0.5);
    ctx.stroke();
  var sd=side(a,'cols');ctx.strokeStyle='#e11';sd.segments.slice(1).forEach(function(g){
    var p=L+Math.round(g[1]/a.fc*bw)+0.5;
    ctx.beginPath();ctx.moveTo(p,T);ctx.lineTo(p,T+H);ctx.stroke();});
  ctx.fillStyle='#222';ctx.font='11px sans-serif';ctx.textAlign='right';
    ctx.textBaseline='middle';
  ctx.fillText(mx.toPrecision(3),L-4,T+4);ctx.fillText('0',L-4,T+H);
  axisLabels(ctx,a,'cols',n,bw,L,T+H);
  $('row-title').textContent='query '+tokenText(a,'rows',st.q)+': attention over the keys';
  $('row').dataset.query=String(st.q);}
function cellsTable(el,rowNames,colNames,vals,fmt,cur,range){el.textContent='';
  var tb=document.createElement('table'),tr=document.createElement('tr');
  [''].concat(colNames).forEach(function(c){var th=document.createElement('th');
    th.className='l';th.textContent=c;tr.appendChild(th);});tb.appendChild(tr);
  var lo=Infinity,hi=-Infinity;vals.forEach(function(r){r.forEach(function(v){if(v!==null){
    lo=Math.min(lo,v);hi=Math.max(hi,v);}});});if(range){lo=range[0];hi=range[1];}
  rowNames.forEach(function(rn,i){var tr2=document.createElement('tr'),
    th=document.createElement('th');th.className='l';th.textContent=rn;tr2.appendChild(th);
    vals[i].forEach(function(v,j){var td=document.createElement('td');if(v!==null){
      td.textContent=fmt(v);
      var q=Math.max(0,Math.min(255,Math.round((v-lo)/((hi-lo)||1)*255)))*3;
        td.style.background='rgb('+lut[q]+','+lut[q+1]+','+lut[q+2]+')';
        td.style.color=q>380?'#000':'#fff';}
      if(cur&&cur[0]===i&&cur[1]===j)td.className='cur';tr2.appendChild(td);});
        tb.appendChild(tr2);});el.appendChild(tb);}
function tables(){if(!D.tables){$('tables').style.display='none';return;}
  var a=view.a,e=D.entropy[a.stack+'|'+a.kind],
  hk=st.head==='avg'?-1:Number(st.head);
  if(e){cellsTable($('entropy'),e.layers.map(String),e.heads.map(function(h){
    return h===-1?'avg':String(h);}),e.values,
    function(v){return v.toFixed(3);},[e.layers.indexOf(a.layer),e.heads.indexOf(hk)],[0,1]);
      }else $('entropy').textContent='(no head_stats rows)';
  var ms=(D.mass[a.name]||{})[String(hk)];
  $('mass-box').style.display=D.mass_shown?'':'none';
  if(ms)cellsTable($('mass'),ms.q,ms.k,ms.m,function(v){return v.toFixed(3);},null);
    else $('mass').textContent='(no segment_mass rows for this head)';
  var tp=(D.pairs[a.name]||{})[st.sample+'|'+hk],el=$('pairs');el.textContent='';
  if(!tp){el.textContent='(no top_pairs rows for this sample and head)';return;}
  var tb=document.createElement('table'),hr=document.createElement('tr');['rank','query','key',
    'weight'].forEach(function(c){var th=document.createElement('th');th.className='l';
    th.textContent=c;hr.appendChild(th);});tb.appendChild(hr);
  tp.forEach(function(p,r){var tr=document.createElement('tr');[String(r+1),
    p[3]+' (#'+p[0]+')',p[4]+' (#'+p[1]+')',
    p[2].toFixed(4)].forEach(function(t,k){
    var td=document.createElement('td');if(k===1||k===2)td.className='l';td.textContent=t;
      tr.appendChild(td);});tb.appendChild(tr);});el.appendChild(tb);}
function writeHash(){if(!useHash)return;
  var p=['array='+encodeURIComponent(st.array),'sample='+st.sample,
  'head='+st.head];if(st.q!==null)p.push('q='+st.q);
  if(st.qseg)p.push('qseg='+encodeURIComponent(st.qseg));if(st.ep!==null)p.push('ep='+st.ep);
  history.replaceState(null,'','#'+p.join('&'));}
function readHash(){var out={};if(!useHash)return out;
  location.hash.replace(/^#/,'').split('&').forEach(function(kv){
  var i=kv.indexOf('=');
  if(i>0)out[decodeURIComponent(kv.slice(0,i))]=decodeURIComponent(kv.slice(i+1));});return out;
    }
function syncHeads(){var a=arrayOf(st.array);
  if(st.head!=='avg'&&a.heads.indexOf(Number(st.head))<0)st.head='avg';
  fill($('sel-head'),[['avg','mean of heads']].concat(a.heads.map(function(h){return [String(h),
    'head '+h];})),st.head);}
function update(){syncHeads();draw();writeHash();}
fill($('sel-array'),D.arrays.map(function(a){return [a.name,a.name];}),st.array);
fill($('sel-sample'),D.samples.map(function(s){return [String(s),'sample '+s];}),st.sample);
var h0=readHash();if(h0.array&&D.arrays.some(function(a){return a.name===h0.array;
  }))st.array=h0.array;
if(h0.sample!==undefined&&D.samples.indexOf(Number(h0.sample))>=0)st.sample=Number(h0.sample);
if(h0.head!==undefined)st.head=h0.head==='avg'?'avg':String(Number(h0.head));
if(h0.q!==undefined&&/^\d+$/.test(h0.q))st.q=Number(h0.q);
if(h0.qseg)st.qseg=h0.qseg;if(h0.ep!==undefined)st.ep=h0.ep;
$('sel-array').value=st.array;$('sel-sample').value=String(st.sample);
$('sel-array').addEventListener('change',function(){st.array=this.value;st.q=null;update();});
$('sel-sample').addEventListener('change',function(){st.sample=Number(this.value);update();});
$('sel-head').addEventListener('change',function(){st.head=this.value;update();});
$('sel-qseg').addEventListener('change',function(){st.qseg=this.value;drawOverlay();writeHash();});
$('sel-episode').addEventListener('change',function(){st.ep=this.value;drawTimeline();
  writeHash();});
$('map').addEventListener('mousemove',hover);
$('map').addEventListener('click',function(ev){var c=cellAt(ev);if(c&&(c.inMap||c.label)){
  st.q=c.i;st.qseg='';drawRow();drawOverlay();writeHash();}});
update();
if(h0.cell&&/^\d+,\d+$/.test(h0.cell)){var ij=h0.cell.split(',').map(Number),
  r=$('map').getBoundingClientRect(),k=scaleOf($('map'));
  $('map').dispatchEvent(new MouseEvent('mousemove',{clientX:r.left+$('map').clientLeft+
    (view.L+(ij[1]+0.5)*view.cs)/k,clientY:r.top+$('map').clientTop+
    (view.T+(ij[0]+0.5)*view.cs)/k}));}
if(h0.click&&/^\d+,\d+$/.test(h0.click)){var cl=h0.click.split(',').map(Number),
  rc=$('map').getBoundingClientRect(),kc=scaleOf($('map'));
  $('map').dispatchEvent(new MouseEvent('click',{clientX:rc.left+$('map').clientLeft+
    (view.L+(cl[1]+0.5)*view.cs)/kc,clientY:rc.top+$('map').clientTop+
    (view.T+(cl[0]+0.5)*view.cs)/kc}));}
var nj=$('nojs');if(nj)nj.parentNode.removeChild(nj); // it ran: no need to explain
R.dataset.ready='1';
})
"""
